//! The seam between the coordinator's logic and its workers: telling a worker what to load or
//! unload. [`GrpcWorkerControl`] is the real one; tests use a fake that records the calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use switchyard_proto::v1::{self, expert_worker_client::ExpertWorkerClient};
use tonic::transport::Channel;

/// How long one worker may take to build its experts.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(30);

pub trait WorkerControl: Send + Sync + 'static {
    fn load(&self, endpoint: &str, request: v1::LoadExpertsRequest) -> impl Future<Output = Result<(), String>> + Send;
    fn unload(&self, endpoint: &str, experts: Vec<v1::ExpertKey>) -> impl Future<Output = Result<(), String>> + Send;
}

/// Calls each worker's LoadExperts / UnloadExperts, one cached channel per endpoint.
#[derive(Debug, Default)]
pub struct GrpcWorkerControl {
    channels: Mutex<HashMap<String, Channel>>,
}

impl GrpcWorkerControl {
    fn client(&self, endpoint: &str) -> Result<ExpertWorkerClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(ExpertWorkerClient::new(channel.clone()));
        }
        let channel = switchyard_common::transport::channel(endpoint)
            .map_err(|error| format!("bad endpoint {endpoint}: {error}"))?;
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(ExpertWorkerClient::new(channel))
    }
}

impl WorkerControl for GrpcWorkerControl {
    async fn load(&self, endpoint: &str, request: v1::LoadExpertsRequest) -> Result<(), String> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(LOAD_TIMEOUT);
        client.load_experts(request).await.map(|_| ()).map_err(|status| status.message().to_owned())
    }

    async fn unload(&self, endpoint: &str, experts: Vec<v1::ExpertKey>) -> Result<(), String> {
        let mut client = self.client(endpoint)?;
        let mut request = tonic::Request::new(v1::UnloadExpertsRequest { experts });
        request.set_timeout(UNLOAD_TIMEOUT);
        client.unload_experts(request).await.map(|_| ()).map_err(|status| status.message().to_owned())
    }
}
