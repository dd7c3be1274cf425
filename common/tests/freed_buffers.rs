//! Its own test binary, without libtest's harness: the allocator's settings are the whole
//! process's and, as in the binaries, made before any other thread starts (glibc fixes how many
//! arenas it makes at a second thread's first allocation, and libtest runs each test on a thread).

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        glibc::settings_in_the_environment_are_left_to_it();
        println!("test settings_in_the_environment_are_left_to_it ... ok");
        glibc::a_buffer_freed_by_one_call_is_resident_for_the_next();
        println!("test a_buffer_freed_by_one_call_is_resident_for_the_next ... ok");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use switchyard_common::freed_buffers::{FreedBuffers, allocator_set_by_environment, keep_freed_buffers};

    const BUFFER_BYTES: usize = 16 << 20;

    /// Minor page faults taken by this thread so far.
    #[allow(unsafe_code)]
    fn thread_minor_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes the calling thread's counters into the buffer it is given.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) }, 0);
        // SAFETY: getrusage succeeded, so it filled the struct (which was zeroed before).
        unsafe { usage.assume_init() }.ru_minflt
    }

    /// Faults taken to fill a new buffer of [`BUFFER_BYTES`] on a thread of its own, as a call's
    /// buffers are filled on a tokio worker or a CPU pool's thread.
    fn faults_filling_a_buffer_on_a_new_thread() -> i64 {
        std::thread::spawn(|| {
            let before = thread_minor_faults();
            let buffer = vec![1u8; BUFFER_BYTES];
            let faults = thread_minor_faults() - before;
            assert_eq!(buffer.iter().map(|byte| *byte as usize).sum::<usize>(), BUFFER_BYTES);
            faults
        })
        .join()
        .expect("the filling thread")
    }

    /// Sets (`Some`) or removes (`None`) an environment variable.
    #[allow(unsafe_code)]
    fn set_env(name: &str, value: Option<&str>) {
        // SAFETY: no other thread runs yet (this binary has no harness), so none reads the
        // environment meanwhile.
        unsafe {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }

    /// glibc's malloc tunables or a `MALLOC_*` variable are the operator's settings, which stand;
    /// other tunables are not. Ends with neither set, whatever the test ran under (glibc read them
    /// at the start; what follows sets the allocator over them).
    pub fn settings_in_the_environment_are_left_to_it() {
        let names: Vec<String> = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()).collect();
        for name in names.iter().filter(|name| name.starts_with("MALLOC_") || *name == "GLIBC_TUNABLES") {
            set_env(name, None);
        }
        assert!(!allocator_set_by_environment());
        set_env("GLIBC_TUNABLES", Some("glibc.cpu.hwcaps=-AVX512F"));
        assert!(!allocator_set_by_environment(), "CPU tunables leave the allocator to Switchyard");
        set_env("GLIBC_TUNABLES", Some("glibc.cpu.hwcaps=-AVX512F:glibc.malloc.arena_max=2"));
        assert!(allocator_set_by_environment());
        set_env("GLIBC_TUNABLES", None);
        set_env("MALLOC_ARENA_MAX", Some("2"));
        assert!(allocator_set_by_environment());
        assert_eq!(keep_freed_buffers(), FreedBuffers::LeftToEnvironment);
        set_env("MALLOC_ARENA_MAX", None);
    }

    /// Without the settings every buffer here is faulted in afresh, as many faults as the first.
    pub fn a_buffer_freed_by_one_call_is_resident_for_the_next() {
        assert_eq!(keep_freed_buffers(), FreedBuffers::Kept);
        // 4096 faults for the new memory, or 8 where the kernel backs the heap with huge pages.
        let first = faults_filling_a_buffer_on_a_new_thread();
        assert!(first > 0, "the first buffer is new memory");
        for call in 1..4 {
            let faults = faults_filling_a_buffer_on_a_new_thread();
            assert!(faults <= first / 8, "call {call}: {faults} faults where the first buffer took {first}");
        }
    }
}
