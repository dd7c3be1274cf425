//! The device's own matrix-product rate, measured in the same run as what is compared with it: the
//! yardstick for "expert compute ran at N% of peak" (f32 GEMM on a CPU, bf16 tensor cores on a GPU).

use std::time::{Duration, Instant};

use switchyard_model::WeightDtype;
use tch::{Device, Tensor};

use crate::expert::kind_of;

/// One measured rate: the best of several timed square products.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulPeak {
    pub device: Device,
    pub dtype: WeightDtype,
    /// libtorch intra-op threads (what a CPU rate depends on).
    pub threads: i32,
    /// The side of the square matrices multiplied.
    pub size: i64,
    pub flops_per_second: f64,
}

/// A size that runs at the device's rate without taking long: 8192 on a GPU (~1.4 ms a product
/// in bf16 on an H200), 2048 on a CPU (~0.1-0.2 s in f32 on one core; 1024 reads 10-20% lower and
/// varies more from run to run), or less where the CPU's path for the dtype is slow (see [`measure`]).
pub fn default_size(device: Device) -> i64 {
    if device.is_cuda() { 8192 } else { 2048 }
}

/// The smallest square a CPU peak is measured on, and how long one product of the chosen size may
/// take: libtorch's bf16 and f16 products fall back to a scalar loop on a CPU without bf16
/// instructions (~0.3 GFLOP/s here, a minute for one 2048³ product), where f32 runs at its peak.
const SMALLEST_CPU_SIZE: i64 = 256;
const CPU_PRODUCT_BUDGET: Duration = Duration::from_millis(500);

/// Measures `size`³ products in `dtype` on `device` with `threads` intra-op threads, on the calling
/// thread (libtorch's thread count is per thread): one warm-up, then the best of `samples` timed
/// batches, each long enough on a GPU that launch latency does not count. On a CPU, `size` is the
/// largest side: a dtype whose products are slow there is measured on the largest square (from
/// 256, doubling) whose product fits `CPU_PRODUCT_BUDGET`, so a slow path still gets a figure
/// in seconds. The peak names the size it used.
pub fn measure(device: Device, dtype: WeightDtype, threads: i32, size: i64, samples: usize) -> MatmulPeak {
    measure_by(Clock::Wall, device, dtype, threads, size, samples)
}

/// What the device can do whatever else runs beside it: [`measure`]'s rate, but on a CPU each
/// product is timed by the CPU time this process was given while it ran (its `threads` threads
/// computing all of it, the process otherwise idle, as a worker is when it starts), not by the
/// wall clock. A worker that starts on a machine whose cores are busy (its neighbours serving a
/// load) otherwise reads several times slower than it is, and is given that much less work for
/// good: a joining worker measured at 2.6 GFLOP/s beside two at 77 while a load ran was given no
/// expert at all. On a GPU it is [`measure`].
pub fn measure_capability(device: Device, dtype: WeightDtype, threads: i32, size: i64, samples: usize) -> MatmulPeak {
    let clock = if device.is_cuda() { Clock::Wall } else { Clock::ProcessCpu { threads } };
    measure_by(clock, device, dtype, threads, size, samples)
}

/// How a product is timed.
#[derive(Debug, Clone, Copy)]
enum Clock {
    Wall,
    /// The process's CPU time over its `threads` computing threads: the wall time the product
    /// would take with every one of them on a core of its own.
    ProcessCpu {
        threads: i32,
    },
}

impl Clock {
    /// How long `work` took by this clock.
    fn time(self, work: impl FnOnce()) -> Duration {
        match self {
            Self::Wall => {
                let started = Instant::now();
                work();
                started.elapsed()
            }
            Self::ProcessCpu { threads } => {
                let started = process_cpu_time();
                work();
                process_cpu_time().saturating_sub(started) / threads.max(1) as u32
            }
        }
    }
}

/// The CPU time this process has been given so far, all its threads together.
pub fn process_cpu_time() -> Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(time.tv_sec.max(0) as u64, time.tv_nsec.clamp(0, 999_999_999) as u32)
}

fn measure_by(clock: Clock, device: Device, dtype: WeightDtype, threads: i32, size: i64, samples: usize) -> MatmulPeak {
    let size = if device.is_cuda() { size } else { affordable_cpu_size(dtype, threads, size) };
    let flops_per_second = product_rate(clock, device, dtype, threads, [size, size, size], samples);
    MatmulPeak { device, dtype, threads, size, flops_per_second }
}

/// Doubles the side from [`SMALLEST_CPU_SIZE`] up to `largest` while the next product, 8x the
/// work of the one just timed, is projected to fit [`CPU_PRODUCT_BUDGET`].
fn affordable_cpu_size(dtype: WeightDtype, threads: i32, largest: i64) -> i64 {
    tch::set_num_threads(threads);
    let _no_grad = tch::no_grad_guard();
    let mut size = SMALLEST_CPU_SIZE.min(largest);
    while size * 2 <= largest {
        let square = Tensor::randn([size, size], (kind_of(dtype), Device::Cpu));
        let started = Instant::now();
        let _product = square.matmul(&square);
        if started.elapsed() * 8 > CPU_PRODUCT_BUDGET {
            break;
        }
        size *= 2;
    }
    size
}

/// FLOP/s of `[m, k] · [k, n]` products, measured as [`measure`] does: the yardstick for a product
/// of one particular shape (a router's `x · W_gᵀ`, say), which may run below the square peak.
pub fn measure_product(device: Device, dtype: WeightDtype, threads: i32, shape: [i64; 3], samples: usize) -> f64 {
    product_rate(Clock::Wall, device, dtype, threads, shape, samples)
}

fn product_rate(
    clock: Clock,
    device: Device,
    dtype: WeightDtype,
    threads: i32,
    [m, k, n]: [i64; 3],
    samples: usize,
) -> f64 {
    tch::set_num_threads(threads);
    let _no_grad = tch::no_grad_guard();
    let options = (kind_of(dtype), device);
    let (a, b) = (Tensor::randn([m, k], options), Tensor::randn([k, n], options));
    let products_per_sample = if device.is_cuda() { 20 } else { 1 };
    let synchronize = || {
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    let _warm_up = a.matmul(&b);
    synchronize();
    let mut best = Duration::MAX;
    for _ in 0..samples.max(1) {
        let took = clock.time(|| {
            for _ in 0..products_per_sample {
                let _product = a.matmul(&b);
            }
            synchronize();
        });
        best = best.min(took);
    }
    let flops = 2.0 * (m * k * n) as f64 * products_per_sample as f64;
    flops / best.as_secs_f64().max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure is a rate of real products: positive, finite, and below what one core could do
    /// at an absurd 1 TFLOP/s.
    #[test]
    fn a_cpu_peak_is_a_plausible_rate() {
        let peak = measure(Device::Cpu, WeightDtype::F32, 1, 128, 3);
        assert_eq!((peak.size, peak.threads, peak.dtype), (128, 1, WeightDtype::F32));
        assert!(peak.flops_per_second > 1e6 && peak.flops_per_second < 1e12, "{peak:?}");
    }

    /// Busy loops in other processes on every core (four to a core) take most of the wall clock from
    /// the products, not the CPU time they are given: the capability holds.
    #[test]
    fn a_cpu_capability_holds_while_other_processes_keep_every_core_busy() {
        struct Spinners(Vec<std::process::Child>);
        impl Drop for Spinners {
            fn drop(&mut self) {
                for child in &mut self.0 {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        // As a worker measures itself: products of ~30 ms alone here, longer than a scheduler slice.
        let capability = || measure_capability(Device::Cpu, WeightDtype::F32, 1, 1024, 2).flops_per_second;
        let alone = capability();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let spinners = Spinners(
            (0..4 * cores)
                .map(|_| std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn())
                .collect::<std::io::Result<_>>()
                .expect("busy loops start"),
        );
        std::thread::sleep(Duration::from_millis(100));
        let busy = capability();
        drop(spinners);
        assert!(busy > 0.5 * alone, "{busy:e} FLOP/s beside {} busy loops against {alone:e} alone", 4 * cores);
    }

    /// f32 products on a CPU are fast enough for the largest side asked for; the side never
    /// exceeds it, and a slow dtype still gets a positive rate, measured on a side it can afford.
    #[test]
    fn a_cpu_peak_uses_the_largest_side_its_dtype_affords() {
        let f32_peak = measure(Device::Cpu, WeightDtype::F32, 1, 512, 1);
        assert_eq!(f32_peak.size, 512, "{f32_peak:?}");
        let bf16_peak = measure(Device::Cpu, WeightDtype::Bf16, 1, 2048, 1);
        assert!((SMALLEST_CPU_SIZE..=2048).contains(&bf16_peak.size), "{bf16_peak:?}");
        assert!(bf16_peak.flops_per_second > 1e6, "{bf16_peak:?}");
    }
}
