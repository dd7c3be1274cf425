//! Membership: workers register, heartbeat and drain; one that falls silent is probed, and removed
//! at once if nothing listens at its address, else once the heartbeat timeout has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_model::ExpertId;
use switchyard_proto::PROTOCOL_VERSION;

use super::{Cluster, HeartbeatReply, Registration, State, WorkerRecord};
use crate::control::{ControlError, WorkerControl};
use crate::error::CoordinatorError;
use crate::placement::WorkerId;

impl<C: WorkerControl> Cluster<C> {
    /// Adds a worker (replacing an earlier record with the same endpoint: a restarted worker).
    pub fn register(&self, registration: Registration) -> Result<(WorkerId, Duration), CoordinatorError> {
        check_protocol(registration.protocol_version)?;
        if registration.endpoint.is_empty() {
            return Err(CoordinatorError::InvalidArgument { field: "endpoint", reason: "must not be empty".into() });
        }
        for (field, text) in
            [("name", &registration.name), ("endpoint", &registration.endpoint), ("device", &registration.device)]
        {
            check_label(field, text)?;
        }
        if registration.memory_bytes == 0 {
            return Err(CoordinatorError::InvalidArgument { field: "memory_bytes", reason: "must be positive".into() });
        }
        if !(registration.compute_gflops.is_finite()
            && (0.0..=MAX_COMPUTE_GFLOPS).contains(&registration.compute_gflops))
        {
            return Err(CoordinatorError::InvalidArgument {
                field: "compute_gflops",
                reason: format!(
                    "{} is not a rate between 0 (unknown) and {MAX_COMPUTE_GFLOPS:e}",
                    registration.compute_gflops
                ),
            });
        }
        let mut state = self.lock();
        state.workers.retain(|id, worker| {
            let replaced = worker.endpoint == registration.endpoint;
            if replaced {
                self.traffic().forget(id);
            }
            !replaced
        });
        if state.workers.len() >= self.config.max_workers {
            let limit = self.config.max_workers;
            let (name, endpoint) = (&registration.name, &registration.endpoint);
            if state.refused_at_the_cap.contains(endpoint) {
                tracing::debug!(%name, %endpoint, limit, "registration refused again: --max-workers reached");
            } else {
                tracing::warn!(%name, %endpoint, limit, "registration refused: --max-workers reached");
                if state.refused_at_the_cap.len() >= super::REMEMBERED_REFUSALS {
                    state.refused_at_the_cap.clear();
                }
                state.refused_at_the_cap.insert(endpoint.clone());
            }
            return Err(CoordinatorError::TooManyWorkers { limit });
        }
        state.refused_at_the_cap.remove(&registration.endpoint);
        state.registrations += 1;
        // Unique across coordinator restarts: a worker heartbeating with the id an earlier
        // coordinator gave it must be told to register again, not be taken for another worker.
        let id = WorkerId(format!("w{}-{:x}", state.registrations, self.epoch));
        let resident =
            registration.loaded_experts.iter().filter(|key| self.config.model.contains(key)).copied().collect();
        tracing::info!(worker_id = %id, name = %registration.name, endpoint = %registration.endpoint, device = %registration.device, "worker registered");
        state.workers.insert(
            id.clone(),
            WorkerRecord {
                id: id.clone(),
                name: registration.name,
                endpoint: registration.endpoint,
                resident_dtype: self
                    .config
                    .model
                    .resident_dtype(registration.dtype, registration.device.starts_with("cuda")),
                device: registration.device,
                memory_bytes: registration.memory_bytes,
                compute_gflops: registration.compute_gflops,
                identity: registration.identity,
                resident,
                last_heartbeat: Instant::now(),
                queued_tokens: 0,
                tokens_served: 0,
                load_failures: 0,
                retry_load_after: None,
                loading: false,
                probing: false,
                draining: false,
            },
        );
        self.metrics.live_workers.set(state.workers.len() as i64);
        // A restarted worker replaced its old record: routes to the old record go.
        self.republish(&mut state);
        drop(state);
        self.wake.notify_one();
        Ok((id, self.config.heartbeat_interval))
    }

    /// Whether `caller` (a certificate, under mutual TLS) may speak for `worker_id`: the one that
    /// registered it. An unknown id is left to the call itself to refuse.
    pub fn check_owner(&self, worker_id: &str, caller: Option<&[u8]>) -> Result<(), CoordinatorError> {
        let state = self.lock();
        match state.workers.get(&WorkerId(worker_id.to_owned())) {
            Some(worker) if worker.identity.is_some() && worker.identity.as_deref() != caller => {
                Err(CoordinatorError::NotOwner(worker_id.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// A worker is alive; `offered` is each of its experts' cumulative count of tokens offered.
    pub fn heartbeat(
        &self,
        protocol_version: u32,
        worker_id: &str,
        queued_tokens: u64,
        tokens_served: u64,
        offered: &[(ExpertId, u64)],
    ) -> Result<HeartbeatReply, CoordinatorError> {
        check_protocol(protocol_version)?;
        let id = WorkerId(worker_id.to_owned());
        let mut state = self.lock();
        let State { workers, target, placed_once, .. } = &mut *state;
        let worker = workers.get_mut(&id).ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_owned()))?;
        worker.last_heartbeat = Instant::now();
        worker.queued_tokens = queued_tokens;
        worker.tokens_served = tokens_served;
        let experts_to_load =
            target.iter().filter(|(expert, owners)| owners.contains(&id) && !worker.resident.contains(expert)).count();
        let placed = *placed_once;
        drop(state);
        self.traffic().record(&id, offered);
        Ok(HeartbeatReply { table_version: self.table.borrow().version, placed, experts_to_load })
    }

    /// A worker that is stopping: place nothing more on it and move its experts away first.
    /// Returns how many experts the published table still routes to it, and the table's version.
    pub fn drain(&self, protocol_version: u32, worker_id: &str) -> Result<(u32, u64), CoordinatorError> {
        check_protocol(protocol_version)?;
        let mut state = self.lock();
        let id = WorkerId(worker_id.to_owned());
        let worker = state.workers.get_mut(&id).ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_owned()))?;
        worker.last_heartbeat = Instant::now();
        if !worker.draining {
            worker.draining = true;
            tracing::info!(worker_id = %id, endpoint = %worker.endpoint, "worker is draining; moving its experts");
            self.wake.notify_one();
        }
        let routed = state.published.values().filter(|owners| owners.contains(&id)).count() as u32;
        Ok((routed, self.table.borrow().version))
    }

    /// Expires silent workers and probes late ones, every half heartbeat interval, forever.
    pub(super) async fn watch_membership(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval / 2);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.check_membership();
            for (id, endpoint) in self.late_workers() {
                let cluster = self.clone();
                tokio::spawn(async move { cluster.probe(id, endpoint).await });
            }
        }
    }

    /// Removes workers silent past the timeout and republishes without them.
    pub fn check_membership(&self) {
        let mut state = self.lock();
        if self.expire_silent(&mut state) {
            self.republish(&mut state);
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Workers that missed a heartbeat and are not being probed yet (each marked as probed).
    pub(super) fn late_workers(&self) -> Vec<(WorkerId, String)> {
        let late_after = self.config.heartbeat_interval.mul_f64(1.5);
        let now = Instant::now();
        let mut state = self.lock();
        state
            .workers
            .values_mut()
            .filter(|worker| !worker.probing && now.duration_since(worker.last_heartbeat) > late_after)
            .map(|worker| {
                worker.probing = true;
                (worker.id.clone(), worker.endpoint.clone())
            })
            .collect()
    }

    /// Asks a late worker whether it is there: one that refuses connections (a killed process) is
    /// removed at once; one that does not answer in time (a stopped one) waits for the timeout.
    pub async fn probe(&self, id: WorkerId, endpoint: String) {
        let outcome = self.control.probe(&endpoint).await;
        let mut state = self.lock();
        if let Some(worker) = state.workers.get_mut(&id) {
            worker.probing = false;
        }
        if let Err(ControlError::Unreachable { message, .. }) = outcome
            && state.workers.remove(&id).is_some()
        {
            tracing::warn!(worker_id = %id, %endpoint, error = %message, "late worker is unreachable; removing it");
            self.metrics.worker_expirations.inc();
            self.traffic().forget(&id);
            self.metrics.live_workers.set(state.workers.len() as i64);
            self.republish(&mut state);
            drop(state);
            self.wake.notify_one();
        }
    }

    pub(super) fn expire_silent(&self, state: &mut State) -> bool {
        let now = Instant::now();
        let timeout = self.config.heartbeat_timeout;
        let before = state.workers.len();
        state.workers.retain(|id, worker| {
            let alive = now.duration_since(worker.last_heartbeat) <= timeout;
            if !alive {
                tracing::warn!(worker_id = %id, endpoint = %worker.endpoint, "worker missed heartbeats; removing it");
                self.metrics.worker_expirations.inc();
                self.traffic().forget(id);
            }
            alive
        });
        self.metrics.live_workers.set(state.workers.len() as i64);
        state.workers.len() != before
    }
}

fn check_protocol(protocol_version: u32) -> Result<(), CoordinatorError> {
    if protocol_version != PROTOCOL_VERSION {
        return Err(CoordinatorError::ProtocolMismatch { worker: protocol_version, coordinator: PROTOCOL_VERSION });
    }
    Ok(())
}

/// A registered compute rate above this (10 PFLOP/s) is a mistake or a lie.
const MAX_COMPUTE_GFLOPS: f64 = 1e7;

/// Longest name, endpoint or device a worker may register with.
const MAX_LABEL_CHARS: usize = 256;

/// A worker's self-description goes into logs, status and metrics labels: a newline or an escape
/// sequence in it could forge log lines or repaint a terminal.
fn check_label(field: &'static str, text: &str) -> Result<(), CoordinatorError> {
    let invalid = |reason: String| Err(CoordinatorError::InvalidArgument { field, reason });
    if text.chars().count() > MAX_LABEL_CHARS {
        return invalid(format!("longer than {MAX_LABEL_CHARS} characters"));
    }
    if let Some(control) = text.chars().find(|c| c.is_control()) {
        return invalid(format!("contains the control character {:?}", control));
    }
    Ok(())
}
