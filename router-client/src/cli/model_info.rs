//! `switchyard model-info`.

use switchyard_model::cli::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct ModelInfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: ModelInfoArgs) -> anyhow::Result<()> {
    let spec = args.model.spec()?;
    let (total, active) = spec.moe_parameters();
    let layers = u64::from(spec.layers);
    println!("model          {}", spec.name);
    if let Some(checkpoint) = &spec.checkpoint {
        println!("checkpoint     {checkpoint}");
    }
    println!("MoE layers     {}", spec.layers);
    println!(
        "experts        {} routed per layer (top-{}, {}), {} shared",
        spec.experts_per_layer,
        spec.top_k,
        if spec.norm_topk_prob { "weights renormalised" } else { "softmax weights" },
        spec.shared_experts
    );
    println!(
        "sizes          d_model {}, d_ff {}, shared d_ff {}, {}",
        spec.d_model,
        spec.d_ff,
        spec.shared_d_ff,
        spec.activation.name()
    );
    println!("parameters     {} in the MoE layers ({} per layer)", human(total), human(total / layers.max(1)));
    println!(
        "active/token   {} ({:.1}% of the MoE parameters)",
        human(active),
        100.0 * active as f64 / total.max(1) as f64
    );
    println!("expert memory  {} MiB in f32 (routed expert {} MiB)", (total * 4) >> 20, spec.expert_bytes() >> 20);
    println!("(attention, embeddings and norms are not counted: Switchyard serves the MoE layers)");
    Ok(())
}

fn human(count: u64) -> String {
    match count {
        0..1_000_000 => format!("{:.1}K", count as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", count as f64 / 1e6),
        _ => format!("{:.2}B", count as f64 / 1e9),
    }
}
