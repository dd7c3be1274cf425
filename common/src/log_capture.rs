//! For tests: what a thread logs, so that a test can assert that an event was said, at which
//! level and how often (an operator's log is part of a component's behaviour).

use std::sync::{Arc, Mutex};

/// The level and message of every event logged on the capturing thread; clones share them.
#[derive(Clone, Default)]
pub struct Logged(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logged {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().expect("not poisoned").push((*event.metadata().level(), message.0));
    }
}

impl Logged {
    /// Captures what this thread logs while the guard lives (a current-thread runtime polls its
    /// tasks on it). tracing caches each callsite's interest process-wide, from the first thread
    /// that reaches it: another test's thread without a subscriber would pin a callsite to "never"
    /// and its events would not arrive here. A global registry that records nothing gives every
    /// thread a subscriber, and the cache is rebuilt once this thread's is set.
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        use tracing_subscriber::layer::SubscriberExt;

        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        let logged = Logged::default();
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(logged.clone()));
        tracing::callsite::rebuild_interest_cache();
        (logged, guard)
    }

    /// How many events said `message` at `level`.
    pub fn count(&self, level: tracing::Level, message: &str) -> usize {
        let logged = self.0.lock().expect("not poisoned");
        logged.iter().filter(|(at, said)| *at == level && said == message).count()
    }

    /// Everything logged so far, for a failing assertion's message.
    pub fn all(&self) -> Vec<(tracing::Level, String)> {
        self.0.lock().expect("not poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_this_thread_are_counted_by_level_and_message() {
        let (logged, _capturing) = Logged::capture();
        tracing::warn!(field = 1, "said twice");
        tracing::warn!("said twice");
        tracing::info!("said twice");
        assert_eq!(logged.count(tracing::Level::WARN, "said twice"), 2);
        assert_eq!(logged.count(tracing::Level::INFO, "said twice"), 1);
        assert_eq!(logged.count(tracing::Level::ERROR, "said twice"), 0);
        assert_eq!(logged.all().len(), 3);
    }
}
