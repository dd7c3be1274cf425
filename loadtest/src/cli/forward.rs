//! `switchyard forward`: one layer call of a running cluster on a tensor file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use switchyard_model::CapacityPolicy;
use switchyard_model::safetensors::{TensorFiles, write_f32};
use switchyard_router_client::{ClientOptions, MoeClient, TableWatcher};

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Coordinator of the cluster, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SWITCHYARD_COORDINATOR", value_parser = super::values::parse_endpoint)]
    pub coordinator: String,
    /// The checkpoint the cluster should be serving; the call is refused if it serves another.
    #[arg(long, env = "SWITCHYARD_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// MoE layer to run, numbered as the checkpoint numbers it (model.layers.{L}; Switch
    /// Transformers' encoder.block.{B}); a dense layer is refused. Default: the first MoE layer.
    #[arg(long, env = "SWITCHYARD_FORWARD_LAYER")]
    pub layer: Option<u32>,
    /// safetensors file holding `hidden_states` [tokens, d_model], or [sequences, tokens, d_model]
    /// for a batch of equal-length sequences (a per-sequence capacity, as Switch Transformers',
    /// then applies to each), in F32, F16 or BF16.
    #[arg(long, env = "SWITCHYARD_FORWARD_INPUT")]
    pub input: PathBuf,
    /// safetensors file to write: `out` (the MoE block's output, shaped as the input) and
    /// `router_logits` [..., experts] (the router's raw output, as transformers' router module
    /// returns it: with GPT-OSS's bias, before DeepSeek-V3's sigmoid and correction bias), F32.
    #[arg(long, env = "SWITCHYARD_FORWARD_OUTPUT")]
    pub output: PathBuf,
    /// Give the call a capacity factor (default: the model's capacity policy).
    #[arg(long, env = "SWITCHYARD_FORWARD_CAPACITY_FACTOR", conflicts_with = "dropless", value_parser = super::values::parse_positive::<f32>)]
    pub capacity_factor: Option<f32>,
    /// Run the call without capacity, whatever the model's policy.
    #[arg(long, env = "SWITCHYARD_FORWARD_DROPLESS")]
    pub dropless: bool,
    /// How long to wait for the coordinator to place every expert before giving up.
    #[arg(long, env = "SWITCHYARD_PLACEMENT_TIMEOUT", default_value = "2m", value_parser = super::values::parse_positive_duration)]
    pub placement_timeout: Duration,
}

pub async fn run(args: ForwardArgs) -> anyhow::Result<()> {
    // The input is read before the cluster is asked anything: a wrong path fails at once.
    let input = TensorFiles::open_file(&args.input);
    let shape = input.shape("hidden_states").with_context(|| format!("reading {}", args.input.display()))?;
    super::coordinator::reach(&args.coordinator).await?;
    let watcher = TableWatcher::start(&args.coordinator)?;
    let table = super::coordinator::wait_for_placement(&watcher, args.placement_timeout).await?;
    if let Some(expected) = &args.checkpoint {
        let expected = expected.canonicalize().with_context(|| format!("--checkpoint {}", expected.display()))?;
        let served = table.model.checkpoint.as_deref().map(|dir| Path::new(dir).canonicalize().ok());
        anyhow::ensure!(
            served == Some(Some(expected.clone())),
            "--checkpoint {}: the cluster serves {}",
            expected.display(),
            table.model.checkpoint.as_deref().unwrap_or("a synthetic model")
        );
    }
    let d_model = table.model.d_model as usize;
    anyhow::ensure!(
        matches!(shape.len(), 2 | 3) && shape.last() == Some(&d_model) && !shape.contains(&0),
        "hidden_states in {} has shape {shape:?}, expected [tokens, {d_model}] or [sequences, tokens, {d_model}]",
        args.input.display()
    );
    let hidden = input.read_f32("hidden_states", &shape)?;
    let mut options = ClientOptions::default();
    options.routing.capacity =
        if args.dropless { Some(CapacityPolicy::Dropless) } else { args.capacity_factor.map(CapacityPolicy::Factor) };
    options.routing.sequence_tokens = (shape.len() == 3).then(|| shape[1]);
    let client = MoeClient::new(watcher.receiver(), options);
    let layer = args.layer.unwrap_or_else(|| table.model.first_layer());
    let output = client.forward(layer, &hidden).await?;
    let mut logits_shape = shape.clone();
    if let Some(last) = logits_shape.last_mut() {
        *last = table.model.experts_per_layer as usize;
    }
    write_f32(
        &args.output,
        &[("out", shape.clone(), &output.hidden), ("router_logits", logits_shape, &output.router_logits)],
    )
    .with_context(|| format!("writing {}", args.output.display()))?;
    let routing = &output.routing;
    println!("layer {layer} of {} ({} tokens) -> {}", table.model.name, routing.tokens, args.output.display());
    let capacity = match options_capacity(&client) {
        CapacityPolicy::Dropless => "dropless".to_owned(),
        _ => format!("capacity {}", routing.capacity),
    };
    println!("  tokens per expert {:?} ({capacity}), dropped {}", routing.tokens_per_expert, routing.dropped);
    println!(
        "  imbalance {:.3} | switch aux loss {:.5} | importance CV² {:.4} | z-loss {:.4}",
        routing.stats.imbalance, routing.stats.switch_aux_loss, routing.stats.importance_cv2, routing.stats.z_loss
    );
    println!("  wall {:.3} ms", output.timing.wall.as_secs_f64() * 1e3);
    Ok(())
}

/// The capacity policy the client's calls run with.
fn options_capacity(client: &MoeClient) -> CapacityPolicy {
    let table_capacity = client.table().map_or(CapacityPolicy::Dropless, |table| table.model.capacity);
    client.options().routing.capacity.unwrap_or(table_capacity)
}
