//! Its own test binary, without libtest's harness: libtorch reads the setting once, at its first
//! CPU allocation, and it is made, as in the binaries, before any other thread starts.

use switchyard_common::huge_pages::{HUGE_PAGE, huge_page_bytes_around, kernel_mode, kernel_takes_advice};
use switchyard_experts::huge_pages::{HugePageTensors, VARIABLE, advise_huge_page_tensors};

fn main() {
    a_large_tensor_is_backed_by_huge_pages_where_the_kernel_offers_them_on_advice();
    println!("test a_large_tensor_is_backed_by_huge_pages_where_the_kernel_offers_them_on_advice ... ok");
}

/// Where the kernel backs only advised memory with huge pages (`madvise`), a tensor's pages are
/// huge only because libtorch advised them.
fn a_large_tensor_is_backed_by_huge_pages_where_the_kernel_offers_them_on_advice() {
    let set_before = std::env::var_os(VARIABLE);
    #[allow(unsafe_code)]
    // SAFETY: the first thing this process does; libtest's harness is off, so no other thread runs.
    let outcome = unsafe { advise_huge_page_tensors() };
    if let Some(value) = set_before {
        assert_eq!(outcome, HugePageTensors::LeftToEnvironment);
        eprintln!("skipped: the environment sets {VARIABLE}={value:?}, and it is left so");
        return;
    }
    assert_eq!(outcome, HugePageTensors::Advised);
    let mode = kernel_mode();
    if !kernel_takes_advice() {
        eprintln!("skipped: transparent huge pages are off here ({mode:?})");
        return;
    }
    let bytes = 32 << 20;
    let weights = tch::Tensor::ones([bytes as i64 / 4], (tch::Kind::Float, tch::Device::Cpu));
    let start = weights.data_ptr() as usize;
    let huge = huge_page_bytes_around(start, start + bytes);
    // 15 or 16 whole huge pages lie inside; the kernel may fall back to small pages for a few
    // where it finds no free 2 MiB at once.
    assert!(huge >= 8 * HUGE_PAGE, "{huge} bytes of huge pages in a 32 MiB tensor (kernel mode {mode:?})");
}
