//! `switchyard status`.

use switchyard_model::ModelSpec;
use switchyard_proto::v1;

use super::coordinator;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Coordinator to ask, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SWITCHYARD_COORDINATOR", value_parser = super::values::parse_endpoint)]
    pub coordinator: String,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = coordinator::client_of(&args.coordinator)?;
    let status =
        coordinator::first_answer(&args.coordinator, client.get_cluster_status(v1::GetClusterStatusRequest {})).await?;
    println!("routing table version {}", status.table_version);
    if let Some(model) = status.model.clone().and_then(|model| ModelSpec::try_from(model).ok()) {
        println!("model {}", model.summary());
    }
    match status.max_workers {
        0 => println!("workers: {}", status.workers.len()),
        most => println!("workers: {} of at most {most} (the coordinator's --max-workers)", status.workers.len()),
    }
    for worker in &status.workers {
        let experts: Vec<String> = worker.experts.iter().map(|key| format!("{}/{}", key.layer, key.expert)).collect();
        println!(
            "{} {} ({}, {:.0} GFLOP/s) {} experts [{}], {} MiB of {} MiB, heartbeat {} ms ago, {} tokens queued",
            worker.worker_id,
            worker.endpoint,
            worker.device,
            worker.compute_gflops,
            worker.experts.len(),
            experts.join(" "),
            worker.assigned_bytes >> 20,
            worker.memory_bytes >> 20,
            worker.millis_since_heartbeat,
            worker.queued_tokens
        );
    }
    if !status.unplaced_experts.is_empty() {
        println!("{} experts have no worker", status.unplaced_experts.len());
    }
    Ok(())
}
