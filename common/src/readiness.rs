//! Whether a process is ready for traffic, as its probes see it: a named gRPC health service
//! (`SERVING` or `NOT_SERVING`) and `GET /readyz` on the metrics port (200, or 503 with the
//! reason). Liveness is another matter: the unnamed health service and `/healthz` answer while the
//! process runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The process's readiness; clones share it.
#[derive(Debug, Clone)]
pub struct Readiness {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    not_ready_because: watch::Sender<Option<String>>,
    /// Set by [`Readiness::stopping`]: nothing makes the process ready again.
    stopping: AtomicBool,
}

impl Readiness {
    /// Ready from the start.
    pub fn ready() -> Self {
        Self::with(None)
    }

    /// Not ready until [`Readiness::set_ready`], for `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self::with(Some(reason.into()))
    }

    fn with(reason: Option<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                not_ready_because: watch::Sender::new(reason),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    pub fn set_ready(&self) {
        self.update(None);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.update(Some(reason.into()));
    }

    /// Not ready for good, for `reason`: the process is stopping.
    pub fn stopping(&self, reason: impl Into<String>) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let reason = reason.into();
        self.shared.not_ready_because.send_replace(Some(reason));
    }

    /// Whether [`Readiness::stopping`] was called: the process is on its way out.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    fn update(&self, reason: Option<String>) {
        self.shared.not_ready_because.send_if_modified(|current| {
            if self.shared.stopping.load(Ordering::SeqCst) || *current == reason {
                return false;
            }
            *current = reason;
            true
        });
    }

    /// `None` when ready, else why not.
    pub fn not_ready_because(&self) -> Option<String> {
        self.shared.not_ready_because.borrow().clone()
    }

    /// Keeps the health service `service_name` of `reporter` in step with this readiness, and
    /// logs each change, until the process ends.
    pub async fn report_to(self, reporter: tonic_health::server::HealthReporter, service_name: &'static str) {
        let mut changes = self.shared.not_ready_because.subscribe();
        loop {
            let reason = changes.borrow_and_update().clone();
            match &reason {
                None => {
                    tracing::info!("ready");
                    reporter.set_service_status(service_name, tonic_health::ServingStatus::Serving).await;
                }
                Some(reason) => {
                    tracing::info!(%reason, "not ready");
                    reporter.set_service_status(service_name, tonic_health::ServingStatus::NotServing).await;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readiness follows its setters, and once the process is stopping it stays not ready.
    #[test]
    fn readiness_follows_its_setters_until_the_process_stops() {
        let readiness = Readiness::not_ready("loading");
        assert_eq!(readiness.not_ready_because().as_deref(), Some("loading"));
        readiness.set_ready();
        assert_eq!(readiness.not_ready_because(), None);
        readiness.set_not_ready("draining");
        assert_eq!(readiness.not_ready_because().as_deref(), Some("draining"));
        readiness.stopping("shutting down");
        readiness.set_ready();
        assert!(readiness.is_stopping());
        assert_eq!(readiness.not_ready_because().as_deref(), Some("shutting down"), "stopping is for good");
    }

    #[tokio::test]
    async fn the_health_service_follows_readiness_and_the_unnamed_one_stays_serving() {
        use tonic_health::pb::health_check_response::ServingStatus as Wire;
        use tonic_health::pb::health_server::Health;

        let reporter = tonic_health::server::HealthReporter::new();
        let health = Arc::new(tonic_health::server::HealthService::from_health_reporter(reporter.clone()));
        let readiness = Readiness::not_ready("loading");
        tokio::spawn(readiness.clone().report_to(reporter, "switchyard.v1.ExpertWorker"));
        let status = |service: &'static str| {
            let health = health.clone();
            async move {
                let request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.into() });
                health.check(request).await.map(|response| response.into_inner().status)
            }
        };
        let settled = |wanted: Wire| async move {
            for _ in 0..200 {
                if status("switchyard.v1.ExpertWorker").await.ok() == Some(wanted as i32) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("the health service never said {wanted:?}");
        };

        settled(Wire::NotServing).await;
        assert_eq!(readiness.not_ready_because().as_deref(), Some("loading"));
        readiness.set_ready();
        settled(Wire::Serving).await;
        assert_eq!(readiness.not_ready_because(), None);
        assert!(!readiness.is_stopping());
        readiness.stopping("draining");
        assert!(readiness.is_stopping());
        settled(Wire::NotServing).await;
        readiness.set_ready();
        assert_eq!(readiness.not_ready_because().as_deref(), Some("draining"), "a stopping process stays not ready");
        assert_eq!(status("").await.ok(), Some(Wire::Serving as i32), "liveness is not readiness");
    }
}
