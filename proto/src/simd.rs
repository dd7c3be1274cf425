//! Loops compiled twice: for AVX2 (twice the lanes) where the CPU has it, for the SSE2 every
//! x86-64 has otherwise. The binaries stay portable (no `target-cpu`), and the hot conversions of
//! the wire format still get the wide registers.

/// Defines `fn $name(args)` running `$portable(args)`, compiled with AVX2 enabled where the CPU
/// has it. `$portable` and what it calls must be `#[inline(always)]`, so that they are compiled
/// into the AVX2 copy (a closure is not: it stays a function of its own, built for SSE2).
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $portable:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    #[allow(unsafe_code)]
                    unsafe {
                        avx2($($arg),*)
                    };
                    return;
                }
            }
            $portable($($arg),*)
        }
    };
}

pub(crate) use widest;
