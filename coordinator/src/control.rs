//! The seam between the coordinator's logic and its workers: telling a worker what to load or
//! unload. [`GrpcWorkerControl`] is the real one; tests use a fake that records the calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use switchyard_model::{ExpertId, ModelSpec};
use switchyard_proto::v1::{self, expert_worker_client::ExpertWorkerClient};
use tonic::transport::Channel;

/// How long one worker may take to build its experts.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A live worker answers a probe in microseconds; a stopped one never does.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What a worker is told to load: these experts of this model, behind queues of these limits.
#[derive(Debug, Clone)]
pub struct ExpertLoad<'a> {
    pub model: &'a ModelSpec,
    pub experts: Vec<ExpertId>,
    /// Tokens a routed expert's queue admits.
    pub queue_limit_tokens: u32,
    /// Tokens a shared expert's queue admits.
    pub shared_queue_limit_tokens: u32,
}

/// Why a worker did not do what it was told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("bad worker endpoint {endpoint}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    /// The worker answered with an error (a load that failed names the expert, tensor and file).
    #[error("worker {endpoint}: {code:?}: {message}")]
    Refused { endpoint: String, code: tonic::Code, message: String },
    /// Nothing listens there (connection refused or reset): the process is gone.
    #[error("worker {endpoint} is unreachable: {message}")]
    Unreachable { endpoint: String, message: String },
}

pub trait WorkerControl: Send + Sync + 'static {
    fn load(&self, endpoint: &str, load: ExpertLoad<'_>) -> impl Future<Output = Result<(), ControlError>> + Send;
    fn unload(&self, endpoint: &str, experts: Vec<ExpertId>) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// Whether the worker answers at all; [`ControlError::Unreachable`] when nothing listens.
    fn probe(&self, endpoint: &str) -> impl Future<Output = Result<(), ControlError>> + Send;
}

/// Calls each worker's LoadExperts / UnloadExperts, one cached channel per endpoint.
#[derive(Debug, Default)]
pub struct GrpcWorkerControl {
    channels: Mutex<HashMap<String, Channel>>,
}

impl GrpcWorkerControl {
    fn client(&self, endpoint: &str) -> Result<ExpertWorkerClient<Channel>, ControlError> {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(ExpertWorkerClient::new(channel.clone()));
        }
        let channel = switchyard_common::transport::channel(endpoint)
            .map_err(|error| ControlError::BadEndpoint { endpoint: endpoint.to_owned(), reason: error.to_string() })?;
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(ExpertWorkerClient::new(channel))
    }
}

fn refused(endpoint: &str) -> impl Fn(tonic::Status) -> ControlError + '_ {
    move |status| match status.code() {
        tonic::Code::Unavailable => {
            ControlError::Unreachable { endpoint: endpoint.to_owned(), message: status.message().to_owned() }
        }
        code => ControlError::Refused { endpoint: endpoint.to_owned(), code, message: status.message().to_owned() },
    }
}

impl WorkerControl for GrpcWorkerControl {
    async fn load(&self, endpoint: &str, load: ExpertLoad<'_>) -> Result<(), ControlError> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(v1::LoadExpertsRequest {
            model: Some(load.model.to_proto()),
            experts: load.experts.into_iter().map(Into::into).collect(),
            queue_limit_tokens: load.queue_limit_tokens,
            shared_queue_limit_tokens: load.shared_queue_limit_tokens,
        });
        request.set_timeout(LOAD_TIMEOUT);
        client.load_experts(request).await.map(|_| ()).map_err(refused(endpoint))
    }

    async fn unload(&self, endpoint: &str, experts: Vec<ExpertId>) -> Result<(), ControlError> {
        let mut client = self.client(endpoint)?;
        let experts = experts.into_iter().map(Into::into).collect();
        let mut request = tonic::Request::new(v1::UnloadExpertsRequest { experts });
        request.set_timeout(UNLOAD_TIMEOUT);
        client.unload_experts(request).await.map(|_| ()).map_err(refused(endpoint))
    }

    async fn probe(&self, endpoint: &str) -> Result<(), ControlError> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(v1::GetStatsRequest {});
        request.set_timeout(PROBE_TIMEOUT);
        client.get_stats(request).await.map(|_| ()).map_err(refused(endpoint))
    }
}
