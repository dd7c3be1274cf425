//! The seam under the client: how one request reaches one worker and its answer comes back.
//!
//! [`ExpertTransport`] is what the exchange needs of a network; [`GrpcTransport`] is the real one
//! (tonic, one HTTP/2 connection per worker, socket bytes counted). The reference layer plugs an
//! in-process transport into the same client, and tests plug scripted ones.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use switchyard_common::clock::unix_nanos;
use switchyard_common::transport::WireCounters;
use switchyard_proto::v1::{self, expert_worker_client::ExpertWorkerClient};
use tonic::transport::Channel;

use crate::error::ClientError;
use crate::ledger::RpcTiming;

/// A worker as the routing table names it (its gRPC endpoint, or an in-process name).
pub type Endpoint = Arc<str>;

/// A worker's answer to one request, with the client's timing of the trip.
#[derive(Debug, Clone)]
pub struct Answer {
    pub response: v1::ForwardResponse,
    pub timing: RpcTiming,
}

/// Metadata key carrying the client's request id across the hop, for the worker's spans.
pub const REQUEST_ID_METADATA: &str = "x-request-id";

/// Carries one request to one worker. Implementations are cheap to share between concurrent calls.
pub trait ExpertTransport: Send + Sync + fmt::Debug {
    /// Sends `request` to `endpoint`; the answer, or why there is none. `deadline` bounds the worker's
    /// side too where the transport can say so (gRPC's `grpc-timeout`); the exchange enforces it.
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>>;

    /// Bytes each worker connection wrote and read on its socket so far: `(endpoint, sent, received)`.
    fn wire_bytes(&self) -> Vec<(Endpoint, u64, u64)> {
        Vec::new()
    }
}

/// A worker's gRPC client and the byte counters of its connection.
type Connection = (ExpertWorkerClient<Channel>, Arc<WireCounters>);

/// gRPC to every worker, one lazily opened connection each.
#[derive(Debug, Default)]
pub struct GrpcTransport {
    connections: Mutex<HashMap<Endpoint, Connection>>,
}

impl GrpcTransport {
    fn connection(&self, endpoint: &Endpoint) -> Result<ExpertWorkerClient<Channel>, ClientError> {
        let mut connections = self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((client, _)) = connections.get(endpoint) {
            return Ok(client.clone());
        }
        let counters = Arc::new(WireCounters::default());
        let channel = switchyard_common::transport::counted_channel(endpoint, counters.clone())
            .map_err(|error| ClientError::BadEndpoint { endpoint: endpoint.to_string(), reason: error.to_string() })?;
        let client = ExpertWorkerClient::new(channel)
            .max_decoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(switchyard_common::transport::MAX_MESSAGE_BYTES);
        connections.insert(endpoint.clone(), (client.clone(), counters));
        Ok(client)
    }
}

impl ExpertTransport for GrpcTransport {
    fn forward(
        &self,
        endpoint: &Endpoint,
        request: v1::ForwardRequest,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<Answer, ClientError>> {
        let connection = self.connection(endpoint);
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let mut client = connection?;
            let request_id = request.request_id;
            let mut request = tonic::Request::new(request);
            request.set_timeout(deadline);
            if let Ok(value) = request_id.to_string().parse() {
                request.metadata_mut().insert(REQUEST_ID_METADATA, value);
            }
            let sent_unix_nanos = unix_nanos();
            let started = Instant::now();
            let answer = client.forward(request).await;
            let timing = RpcTiming { elapsed: started.elapsed(), sent_unix_nanos, answered_unix_nanos: unix_nanos() };
            match answer {
                Ok(response) => Ok(Answer { response: response.into_inner(), timing }),
                Err(status) => Err(ClientError::from_status(&endpoint, &status)),
            }
        })
    }

    fn wire_bytes(&self) -> Vec<(Endpoint, u64, u64)> {
        let connections = self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut bytes: Vec<_> = connections
            .iter()
            .map(|(endpoint, (_, counters))| (endpoint.clone(), counters.sent(), counters.received()))
            .collect();
        bytes.sort();
        bytes
    }
}
