//! The gRPC adapter over [`Cluster`]: convert, call, map the error. No logic.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use switchyard_model::{ExpertId, WeightDtype};
use switchyard_proto::v1::{self, coordinator_server};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Registration};
use crate::control::WorkerControl;
use crate::error::CoordinatorError;

#[derive(Debug)]
pub struct CoordinatorService<C> {
    cluster: Arc<Cluster<C>>,
    /// Becomes true at shutdown: table streams end then, or graceful shutdown would wait on them forever.
    stopping: watch::Receiver<bool>,
}

impl<C: WorkerControl> CoordinatorService<C> {
    pub fn new(cluster: Arc<Cluster<C>>, stopping: watch::Receiver<bool>) -> Self {
        Self { cluster, stopping }
    }
}

type TableStream = Pin<Box<dyn Stream<Item = Result<v1::RoutingTable, Status>> + Send>>;

#[tonic::async_trait]
impl<C: WorkerControl> coordinator_server::Coordinator for CoordinatorService<C> {
    async fn register_worker(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let identity = caller(&request).map(<[u8]>::to_vec);
        let request = request.into_inner();
        let registration = Registration {
            protocol_version: request.protocol_version,
            name: request.name,
            endpoint: request.endpoint,
            device: request.device,
            memory_bytes: request.memory_bytes,
            dtype: WeightDtype::from_proto(request.weight_dtype)
                .map_err(|reason| CoordinatorError::InvalidArgument { field: "weight_dtype", reason })?,
            loaded_experts: request.loaded_experts.into_iter().map(Into::into).collect(),
            compute_gflops: request.compute_gflops,
            identity,
        };
        let (worker_id, interval) = self.cluster.register(registration)?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            worker_id: worker_id.0,
            heartbeat_interval_ms: interval.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.cluster.check_owner(&request.get_ref().worker_id, caller(&request))?;
        let request = request.into_inner();
        let reply = self.cluster.heartbeat(
            request.protocol_version,
            &request.worker_id,
            request.queued_tokens,
            request.tokens_served,
            &offered_tokens(&request.experts),
        )?;
        Ok(Response::new(v1::HeartbeatResponse {
            table_version: reply.table_version,
            placed: reply.placed,
            experts_to_load: reply.experts_to_load as u32,
        }))
    }

    async fn get_routing_table(
        &self,
        _request: Request<v1::GetRoutingTableRequest>,
    ) -> Result<Response<v1::RoutingTable>, Status> {
        Ok(Response::new(self.cluster.table().as_ref().clone()))
    }

    type WatchRoutingTableStream = TableStream;

    /// [`Cluster::tables_after`] what the caller holds, until shutdown.
    async fn watch_routing_table(
        &self,
        request: Request<v1::GetRoutingTableRequest>,
    ) -> Result<Response<Self::WatchRoutingTableStream>, Status> {
        let request = request.into_inner();
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let tables = self
            .cluster
            .tables_after(request.newer_than, request.epoch)
            .map(|table| Ok(table.as_ref().clone()))
            .take_until(stopped);
        Ok(Response::new(Box::pin(tables)))
    }

    async fn drain_worker(
        &self,
        request: Request<v1::DrainWorkerRequest>,
    ) -> Result<Response<v1::DrainWorkerResponse>, Status> {
        self.cluster.check_owner(&request.get_ref().worker_id, caller(&request))?;
        let request = request.into_inner();
        let (routed_experts, table_version) = self.cluster.drain(request.protocol_version, &request.worker_id)?;
        Ok(Response::new(v1::DrainWorkerResponse { routed_experts, table_version }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Ok(Response::new(self.cluster.status()))
    }
}

/// The tokens each expert of a heartbeat was offered: those it admitted and those it refused for
/// want of room, the demand traffic balancing weighs (not only what fit).
fn offered_tokens(experts: &[v1::ExpertStats]) -> Vec<(ExpertId, u64)> {
    experts
        .iter()
        .filter_map(|stats| {
            Some((ExpertId::from(stats.expert?), stats.admitted_tokens.saturating_add(stats.rejected_tokens)))
        })
        .collect()
}

/// The certificate a call came over, when the server runs mutual TLS.
fn caller<T>(request: &Request<T>) -> Option<&[u8]> {
    request.extensions().get::<switchyard_common::tls::PeerIdentity>().map(|identity| identity.certificate.as_slice())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use switchyard_common::tls::PeerIdentity;
    use switchyard_proto::PROTOCOL_VERSION;
    use switchyard_proto::v1::coordinator_server::Coordinator;

    use super::*;
    use crate::cluster::tests::{FakeControl, config};
    use crate::metrics::CoordinatorMetrics;

    /// `message` as a call over a connection whose client presented `certificate`.
    fn over<T>(message: T, certificate: &[u8]) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(PeerIdentity { roles: Vec::new(), certificate: certificate.to_vec() });
        request
    }

    fn heartbeat(worker_id: &str) -> v1::HeartbeatRequest {
        v1::HeartbeatRequest { protocol_version: PROTOCOL_VERSION, worker_id: worker_id.into(), ..Default::default() }
    }

    /// Each call reaches the cluster and answers what the cluster says; a worker id registered
    /// over one certificate is refused to the holder of another.
    #[tokio::test]
    async fn every_call_answers_what_the_cluster_says() {
        let cluster = Cluster::new(config(1), Arc::new(FakeControl::default()), CoordinatorMetrics::default());
        let (stop, stopping) = watch::channel(false);
        let service = CoordinatorService::new(cluster.clone(), stopping);
        let registration = v1::RegisterWorkerRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "a".into(),
            endpoint: "a".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            ..Default::default()
        };
        let registered = service.register_worker(over(registration, b"a's")).await.expect("registered").into_inner();
        assert_eq!(registered.heartbeat_interval_ms, 10);
        assert_eq!(cluster.status().workers.len(), 1);
        cluster.reconcile_once().await;
        let table = cluster.table();
        assert_eq!(table.version, 1, "a's load landed");

        let id = registered.worker_id.as_str();
        let beat = service.heartbeat(over(heartbeat(id), b"a's")).await.expect("a's heartbeat").into_inner();
        assert_eq!((beat.table_version, beat.placed, beat.experts_to_load), (1, true, 0));
        let refused = service.heartbeat(over(heartbeat(id), b"b's")).await.expect_err("another certificate");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        let unknown = service.heartbeat(Request::new(heartbeat("nobody"))).await.expect_err("never registered");
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

        let asked = v1::GetRoutingTableRequest::default();
        let answered = service.get_routing_table(Request::new(asked)).await.expect("table").into_inner();
        assert_eq!(answered, *table);
        let status = service.get_cluster_status(Request::new(v1::GetClusterStatusRequest::default())).await;
        assert_eq!(status.expect("status").into_inner(), cluster.status());

        let mut watching = service.watch_routing_table(Request::new(asked)).await.expect("watch").into_inner();
        let watched = watching.next().now_or_never().flatten().expect("the current table, at once").expect("a table");
        assert_eq!(watched.version, 1);
        let drain = v1::DrainWorkerRequest { protocol_version: PROTOCOL_VERSION, worker_id: id.into() };
        let refused = service.drain_worker(over(drain.clone(), b"b's")).await.expect_err("another certificate");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        let drained = service.drain_worker(over(drain, b"a's")).await.expect("drained").into_inner();
        assert_eq!((drained.routed_experts, drained.table_version), (8, 1), "no other worker to move them to");
        stop.send_replace(true);
        assert!(matches!(watching.next().now_or_never(), Some(None)), "a watch ends at shutdown, at once");
    }

    #[test]
    fn an_expert_was_offered_what_it_admitted_and_what_it_refused() {
        let stats = |expert: Option<ExpertId>, admitted_tokens, rejected_tokens| v1::ExpertStats {
            expert: expert.map(Into::into),
            admitted_tokens,
            rejected_tokens,
            ..Default::default()
        };
        let experts =
            [stats(Some(ExpertId::new(1, 3)), 5, 2), stats(None, 9, 9), stats(Some(ExpertId::new(1, 4)), 0, 6)];
        assert_eq!(offered_tokens(&experts), [(ExpertId::new(1, 3), 7), (ExpertId::new(1, 4), 6)]);
        // A peer's counters near the top saturate: wrapped, they would read as almost no traffic.
        let huge = [stats(Some(ExpertId::new(0, 0)), u64::MAX, 1)];
        assert_eq!(offered_tokens(&huge), [(ExpertId::new(0, 0), u64::MAX)]);
    }

    /// Any registration, heartbeats and drain a network peer can send, as the service receives
    /// them decoded (prost's decoding of the bytes is prost's to test), over any certificate or
    /// none: each is taken, or refused with a status whose message begins with the field it
    /// names, never a panic, also in placement and balancing over the figures it reported (this
    /// crate's arithmetic is overflow-checked in every profile: `Cargo.toml`). A heartbeat or a
    /// drain is taken only for the id its registration was given, at the current protocol, over
    /// the certificate it registered over if it had one; only well-formed workers are listed.
    mod hostile_peers {
        use std::time::Duration;

        use proptest::prelude::*;

        use super::*;
        use crate::cluster::{Balancing, ClusterConfig};

        const FIELDS: [&str; 8] = [
            "protocol_version",
            "name",
            "endpoint",
            "device",
            "memory_bytes",
            "weight_dtype",
            "compute_gflops",
            "worker_id",
        ];

        fn count() -> impl Strategy<Value = u64> {
            prop_oneof![0u64..1000, Just(u64::MAX), any::<u64>()]
        }

        /// Mostly keys around the test model's experts (some past its layer or its count), else any.
        fn expert_key() -> impl Strategy<Value = v1::ExpertKey> {
            prop_oneof![3 => (0u32..2, 0u32..10), 1 => any::<(u32, u32)>()]
                .prop_map(|(layer, expert)| v1::ExpertKey { layer, expert })
        }

        /// Mostly what a worker would send; else anything, over-long or with control characters.
        fn label() -> impl Strategy<Value = String> {
            prop_oneof![3 => "[a-z0-9:./-]{1,40}", 1 => ".{0,300}"]
        }

        fn registration() -> impl Strategy<Value = v1::RegisterWorkerRequest> {
            (
                prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u32>()],
                (label(), label(), label()),
                prop_oneof![1 => Just(0), 3 => 1u64..1 << 40, 1 => Just(u64::MAX), 1 => any::<u64>()],
                prop::collection::vec(expert_key(), 0..12),
                prop_oneof![3 => 0i32..4, 1 => any::<i32>()],
                prop_oneof![1 => Just(0.0), 3 => 0.0..1e6, 1 => Just(f64::MAX), 1 => any::<f64>()],
            )
                .prop_map(
                    |(protocol_version, (name, endpoint, device), memory_bytes, loaded, dtype, gflops)| {
                        v1::RegisterWorkerRequest {
                            protocol_version,
                            name,
                            endpoint,
                            device,
                            memory_bytes,
                            loaded_experts: loaded,
                            weight_dtype: dtype,
                            compute_gflops: gflops,
                        }
                    },
                )
        }

        /// A heartbeat; its id `None` is filled in with the one the registration was given.
        fn heartbeat() -> impl Strategy<Value = (Option<String>, v1::HeartbeatRequest)> {
            let stats = (prop::option::of(expert_key()), count(), count(), count()).prop_map(
                |(expert, queued_tokens, admitted_tokens, rejected_tokens)| v1::ExpertStats {
                    expert,
                    queued_tokens,
                    admitted_tokens,
                    rejected_tokens,
                    ..Default::default()
                },
            );
            (
                prop_oneof![3 => Just(None), 1 => ".{0,24}".prop_map(Some)],
                prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u32>()],
                count(),
                count(),
                prop::collection::vec(stats, 0..8),
            )
                .prop_map(|(worker_id, protocol_version, queued_tokens, tokens_served, experts)| {
                    let request = v1::HeartbeatRequest {
                        protocol_version,
                        worker_id: worker_id.clone().unwrap_or_default(),
                        queued_tokens,
                        tokens_served,
                        experts,
                    };
                    (worker_id, request)
                })
        }

        /// The certificate a call comes over: none (no mutual TLS), or one of two.
        fn certificate() -> impl Strategy<Value = Option<&'static [u8]>> {
            prop_oneof![Just(None), Just(Some(&b"a's"[..])), Just(Some(&b"b's"[..]))]
        }

        fn from<T>(message: T, certificate: Option<&[u8]>) -> Request<T> {
            match certificate {
                Some(certificate) => over(message, certificate),
                None => Request::new(message),
            }
        }

        fn refused_by_name(status: &Status) -> bool {
            FIELDS.iter().any(|field| status.message().starts_with(&format!("{field}: ")))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_registration_heartbeat_and_drain_is_taken_or_refused_by_name(
                (registration, registered_over) in (registration(), certificate()),
                (heartbeat_id, mut heartbeat) in heartbeat(),
                second_heartbeat in heartbeat(),
                callers in prop::collection::vec(certificate(), 3),
                drain_protocol in prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u32>()],
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                runtime.block_on(async {
                    let balancing = Some(Balancing { interval: Duration::ZERO, redundant: 2 });
                    let config = ClusterConfig { balancing, ..config(1) };
                    let cluster = Cluster::new(config, Arc::new(FakeControl::default()), CoordinatorMetrics::default());
                    let (_stop, stopping) = watch::channel(false);
                    let service = CoordinatorService::new(cluster.clone(), stopping);

                    let registered =
                        service.register_worker(from(registration, registered_over)).await.map(Response::into_inner);
                    if let Err(status) = &registered {
                        prop_assert!(refused_by_name(status), "{status:?}");
                    }
                    cluster.reconcile_once().await;
                    if heartbeat_id.is_none() {
                        let given = registered.as_ref().map(|answer| answer.worker_id.clone());
                        heartbeat.worker_id = given.unwrap_or_default();
                    }
                    let known = registered.as_ref().is_ok_and(|answer| answer.worker_id == heartbeat.worker_id);
                    // Only the certificate a worker registered over may speak for it, if it had one.
                    let owner = |caller: Option<&[u8]>| registered_over.is_none() || caller == registered_over;
                    let worker_id = heartbeat.worker_id.clone();
                    let again = v1::HeartbeatRequest { worker_id: worker_id.clone(), ..second_heartbeat.1 };
                    for (beat, caller) in [heartbeat, again].into_iter().zip(callers.iter().copied()) {
                        let taken = known && owner(caller) && beat.protocol_version == PROTOCOL_VERSION;
                        let answer = service.heartbeat(from(beat, caller)).await;
                        prop_assert_eq!(answer.is_ok(), taken, "{:?}", answer);
                        if let Err(status) = &answer {
                            prop_assert!(refused_by_name(status), "{status:?}");
                        }
                        cluster.rebalance_by_traffic();
                        cluster.reconcile_once().await;
                    }
                    let drain = v1::DrainWorkerRequest { protocol_version: drain_protocol, worker_id };
                    let drained = service.drain_worker(from(drain, callers[2])).await;
                    let taken = known && owner(callers[2]) && drain_protocol == PROTOCOL_VERSION;
                    prop_assert_eq!(drained.is_ok(), taken, "{:?}", drained);
                    if let Err(status) = &drained {
                        prop_assert!(refused_by_name(status), "{status:?}");
                    }
                    cluster.reconcile_once().await;
                    for worker in cluster.status().workers {
                        let well_formed = !worker.name.chars().any(char::is_control) && !worker.endpoint.is_empty();
                        prop_assert!(well_formed, "{worker:?}");
                    }
                    Ok(())
                })?;
            }
        }
    }
}
