//! The in-process transport: the client's requests go straight to [`ExpertWorkerService`]s in this
//! process, through the same decoding, validation, queues, batching, compute and encoding as over
//! gRPC, minus the network. A worker's refusal becomes a status with details and is read back by
//! [`ClientError::from_status`], exactly as the gRPC transport reads it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use switchyard_common::clock::unix_nanos;
use switchyard_common::otlp::RemoteParent;
use switchyard_expert_worker::ExpertWorkerService;
use switchyard_proto::v1;
use switchyard_router_client::ClientError;
use switchyard_router_client::ledger::RpcTiming;
use switchyard_router_client::transport::{Answer, Endpoint, ExpertTransport};

/// Workers of this process, by the endpoint name the routing table gives them.
#[derive(Debug, Default)]
pub struct InProcessTransport {
    workers: HashMap<Endpoint, ExpertWorkerService>,
}

impl InProcessTransport {
    pub fn new(workers: impl IntoIterator<Item = (Endpoint, ExpertWorkerService)>) -> Self {
        Self { workers: workers.into_iter().collect() }
    }
}

impl ExpertTransport for InProcessTransport {
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        _deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        let service = self.workers.get(endpoint).cloned();
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let service = service.ok_or_else(|| ClientError::BadEndpoint {
                endpoint: endpoint.to_string(),
                reason: "no worker of that name in this process".into(),
            })?;
            let sent_unix_nanos = unix_nanos();
            let started = Instant::now();
            let answered = service.forward_message(request, &RemoteParent::default(), None).await;
            let timing = RpcTiming { elapsed: started.elapsed(), sent_unix_nanos, answered_unix_nanos: unix_nanos() };
            match answered {
                Ok(response) => Ok(Answer { response, timing }),
                Err(error) => Err(ClientError::from_status(&endpoint, &tonic::Status::from(error))),
            }
        })
    }
}
