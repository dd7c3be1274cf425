//! `switchyard model-info`.

use switchyard_model::WeightDtype;
use switchyard_model::cli::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct ModelInfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: ModelInfoArgs) -> anyhow::Result<()> {
    let spec = args.model.spec()?;
    let (total, active) = spec.moe_parameters();
    let layers = u64::from(spec.layer_count());
    println!("model          {}", spec.name);
    match &spec.checkpoint {
        Some(checkpoint) => {
            println!("family         {} (model_type {})", spec.family, spec.family.model_type());
            println!("checkpoint     {checkpoint}");
            println!(
                "MoE layers     {} {} (as the checkpoint numbers them)",
                spec.layer_count(),
                spec.describe_layers()
            );
        }
        None => {
            println!("family         {} (seeded weights)", spec.family);
            println!("MoE layers     {} {}", spec.layer_count(), spec.describe_layers());
        }
    }
    println!("experts        {} routed per layer, {} shared", spec.experts_per_layer, spec.shared_experts);
    println!("router         {}", spec.router.describe(spec.top_k));
    let shared = if spec.shared_experts > 0 {
        format!(", shared d_ff {}{}", spec.shared_d_ff, if spec.shared_expert_gate { " (sigmoid-gated)" } else { "" })
    } else {
        String::new()
    };
    let biases = if spec.expert_bias { " with biases" } else { "" };
    println!("expert form    {}{biases}, d_model {}, d_ff {}{shared}", spec.activation, spec.d_model, spec.d_ff);
    let source = match (args.model.capacity_override(), spec.checkpoint.is_some()) {
        (Some(_), _) => "set by flag",
        (None, true) => "the architecture's own",
        (None, false) => "the synthetic model's default",
    };
    println!("capacity       {} [{source}]", spec.capacity);
    println!("parameters     {} ({total}) in the MoE layers, {} per layer", human(total), human(total / layers.max(1)));
    println!(
        "active/token   {} ({active}), {:.1}% of the MoE parameters",
        human(active),
        100.0 * active as f64 / total.max(1) as f64
    );
    let in_dtype = |dtype: WeightDtype| {
        let element = dtype.element_size() as u64;
        format!("{} in {dtype} (a routed expert: {})", bytes(total * element), bytes(spec.expert_bytes_of(0, dtype)))
    };
    match spec.stored_dtype {
        Some(stored) => {
            println!("expert memory  {} as stored; workers keep that dtype unless --dtype", in_dtype(stored))
        }
        None => println!(
            "expert memory  {} on a GPU, {} on a CPU (the workers' defaults)",
            in_dtype(WeightDtype::Bf16),
            in_dtype(WeightDtype::F32)
        ),
    }
    println!("(attention, embeddings, norms and dense layers are not counted: Switchyard serves the MoE layers)");
    Ok(())
}

fn bytes(count: u64) -> String {
    match count {
        0..1_048_576 => format!("{:.1} KiB", count as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", count as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", count as f64 / 1_073_741_824.0),
    }
}

fn human(count: u64) -> String {
    match count {
        0..1_000_000 => format!("{:.1}K", count as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", count as f64 / 1e6),
        _ => format!("{:.2}B", count as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_in_the_unit_that_fits() {
        assert_eq!(bytes(512 * 1024), "512.0 KiB");
        assert_eq!(bytes(3 * 1_048_576 / 2), "1.5 MiB");
        assert_eq!(bytes(94 * 1_073_741_824), "94.00 GiB");
        assert_eq!(human(12_500), "12.5K");
        assert_eq!(human(46_700_000), "46.7M");
        assert_eq!(human(46_702_792_704), "46.70B");
    }
}
