//! The in-process reference layer as a load-test baseline: `loadtest --reference` and `local
//! --compare-reference`.

use std::sync::Arc;

use switchyard_common::tracing_setup::TracingArgs;
use switchyard_experts::ResolveDevice;
use switchyard_loadtest::loadtest::{self, LoadSpec, Target};
use switchyard_reference::{ReferenceConfig, ReferenceLayer};

use crate::cli::loadtest::{LoadtestArgs, report_and_finish};
use crate::cli::local::{ClusterRun, LocalArgs, load_test_cluster};

/// `loadtest --reference`: the load through the in-process reference layer.
pub async fn loadtest_reference(args: LoadtestArgs, torch_threads: u32) -> anyhow::Result<()> {
    let model = args.model.spec()?;
    args.load.check_layers(&model)?;
    eprintln!("building the in-process reference layer ({} experts)...", model.experts_per_layer);
    let layer = args.load.layer(&model);
    let config = ReferenceConfig {
        device: args.device.resolve(),
        torch_threads,
        dtype: args.dtype.map(Into::into),
        ..ReferenceConfig::cpu()
    };
    let layers = args.load.step(&model).map_or_else(|| vec![layer], |step| step.layers);
    let reference = ReferenceLayer::start(&model, &layers, config).await?;
    let name = format!("in-process reference ({torch_threads} torch threads)");
    let spec = LoadSpec {
        routing: args.load.routing(&model)?,
        skew: args.load.skew.resolve(None, layer)?,
        ..args.load.spec(&model)
    };
    let report = loadtest::run(Target::Reference(Arc::new(reference)), spec, &name).await?;
    report_and_finish(&args, report, &model)
}

/// `local --loadtest --compare-reference`: the cluster's load test, then the same load through the
/// in-process reference layer.
pub async fn local_compared(args: LocalArgs, tracing: &TracingArgs) -> anyhow::Result<()> {
    let Some(ClusterRun { report, spec, model }) = load_test_cluster(&args, tracing).await? else {
        return Ok(());
    };
    // A fair baseline: as many libtorch threads as all the workers had together.
    let threads = (args.workers as u32 * args.worker_torch_threads).max(1);
    eprintln!("same load through the in-process reference layer ({threads} torch threads)...");
    // Where the workers computed: CUDA when present, in their dtype.
    let device = tch::Device::cuda_if_available();
    let dtype = args.dtype.map(Into::into);
    let config = ReferenceConfig { device, torch_threads: threads, dtype, ..ReferenceConfig::cpu() };
    let layers = spec.step.as_ref().map_or_else(|| vec![spec.layer], |step| step.layers.clone());
    let reference = ReferenceLayer::start(&model, &layers, config).await?;
    let name = format!("in-process reference ({threads} torch threads)");
    let baseline = loadtest::run(Target::Reference(Arc::new(reference)), spec, &name).await?.summary();
    print!("{}", switchyard_loadtest::report::text::load_report(&baseline));
    args.load.finish(vec![report, baseline], &model)
}
