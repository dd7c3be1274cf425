//! One large piece of CPU work split over threads scoped to it.

/// Runs `work` on each of `parts` at once: the first on the calling thread, each other on a thread
/// named `name`, scoped to this call. For work split by the caller into parts each far larger than
/// starting a thread costs (~50-100 µs on a small VM). A thread that cannot start is the system's
/// failure: it panics, for the caller's panic guard to answer.
pub fn on_scoped_threads<T: Send>(name: &str, parts: impl IntoIterator<Item = T>, work: impl Fn(T) + Sync) {
    let work = &work;
    std::thread::scope(|scope| {
        let mut parts = parts.into_iter();
        let own = parts.next();
        for part in parts {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn_scoped(scope, move || work(part))
                .expect("a thread for a share of the work starts");
        }
        if let Some(part) = own {
            work(part);
        }
    });
}
