//! The layers' gates in memory, each read once. A checkpoint's gate is read from disk by its
//! layer's first call; that read holds only its own layer's slot, so the first calls of other
//! layers neither wait for it nor read their gates twice.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

use crate::lock;

/// One value per key, made by the first caller that asks for it. A failed load leaves the slot
/// empty, so the next caller tries again.
#[derive(Debug)]
pub(crate) struct LoadOnce<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

#[derive(Debug)]
struct Slot<V> {
    value: OnceLock<Arc<V>>,
    /// Held by the caller loading the value, so that callers of the same key wait for its load.
    loading: Mutex<()>,
}

impl<K, V> Default for LoadOnce<K, V> {
    fn default() -> Self {
        Self { slots: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone, V> LoadOnce<K, V> {
    /// Whether `key`'s value is in memory (a call needing it will not wait for a load).
    pub(crate) fn is_loaded(&self, key: &K) -> bool {
        lock(&self.slots).get(key).is_some_and(|slot| slot.value.get().is_some())
    }

    /// `key`'s value, made by `load` if no caller has made it yet. Callers asking for the same key
    /// meanwhile wait for this load; callers asking for other keys do not.
    pub(crate) fn get_or_load<E>(&self, key: &K, load: impl FnOnce() -> Result<V, E>) -> Result<Arc<V>, E> {
        let slot = lock(&self.slots)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Slot { value: OnceLock::new(), loading: Mutex::new(()) }))
            .clone();
        if let Some(value) = slot.value.get() {
            return Ok(value.clone());
        }
        let _loading = lock(&slot.loading);
        if let Some(value) = slot.value.get() {
            return Ok(value.clone());
        }
        let value = Arc::new(load()?);
        Ok(slot.value.get_or_init(|| value).clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_slow_load_does_not_hold_up_another_key() {
        let cache = Arc::new(LoadOnce::<u32, &'static str>::default());
        let (started, wait_started) = mpsc::channel();
        let (release, wait_release) = mpsc::channel::<()>();
        let slow = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                cache.get_or_load(&1, || {
                    started.send(()).unwrap();
                    wait_release.recv_timeout(Duration::from_secs(10)).map(|_| "layer 1")
                })
            })
        };
        wait_started.recv().unwrap();
        assert!(!cache.is_loaded(&1), "a load in progress is not loaded");

        let (done, wait_done) = mpsc::channel();
        let other = {
            let cache = cache.clone();
            std::thread::spawn(move || done.send(cache.get_or_load(&2, || Ok::<_, ()>("layer 2"))).unwrap())
        };
        let second = wait_done.recv_timeout(Duration::from_secs(5)).expect("layer 2 loads while layer 1 is loading");
        assert_eq!(*second.unwrap(), "layer 2");
        assert!(cache.is_loaded(&2));
        assert!(!cache.is_loaded(&1));

        release.send(()).unwrap();
        assert_eq!(*slow.join().unwrap().unwrap(), "layer 1");
        assert!(cache.is_loaded(&1));
        other.join().unwrap();
    }

    #[test]
    fn a_key_loads_once_among_racing_callers_and_a_failure_is_retried() {
        let cache = Arc::new(LoadOnce::<u32, usize>::default());
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(cache.get_or_load(&7, || Err("unreadable")), Err("unreadable"));
        assert!(!cache.is_loaded(&7), "a failed load leaves nothing");

        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                std::thread::spawn(move || {
                    *cache
                        .get_or_load(&7, || {
                            std::thread::sleep(Duration::from_millis(20));
                            Ok::<_, ()>(loads.fetch_add(1, Ordering::SeqCst) + 100)
                        })
                        .unwrap()
                })
            })
            .collect();
        let values: Vec<usize> = callers.into_iter().map(|caller| caller.join().unwrap()).collect();
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for every caller");
        assert!(values.iter().all(|&value| value == 100), "{values:?}");
    }
}
