//! Reaching a cluster's coordinator from the command line: an address nobody answers on fails at
//! once, naming it, and a wait for every expert to be placed says what it waits for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::{self, coordinator_client::CoordinatorClient};
use switchyard_router_client::{RoutingTableView, TableWatcher};
use tonic::transport::Channel;

/// How long a coordinator has to answer the first request.
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long a wait for placement stays quiet before it says what it waits for.
const QUIET_WAIT: Duration = Duration::from_secs(2);

/// A client of `coordinator`, once it has answered a request.
pub async fn reach(coordinator: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let mut client = client_of(coordinator)?;
    first_answer(coordinator, client.get_routing_table(v1::GetRoutingTableRequest::default())).await?;
    Ok(client)
}

/// A client of `coordinator`; it dials on its first request.
pub fn client_of(coordinator: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    Ok(CoordinatorClient::new(switchyard_common::transport::channel(coordinator)?))
}

/// The answer to a first request to `coordinator`, or why none came: nobody answering at the
/// address, a refusal (named by its code), or no answer within [`FIRST_ANSWER_WITHIN`].
pub async fn first_answer<T>(
    coordinator: &str,
    request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(FIRST_ANSWER_WITHIN, request).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            anyhow::bail!("cannot reach the coordinator at {coordinator}: {}", status.message())
        }
        Ok(Err(status)) => {
            anyhow::bail!("the coordinator at {coordinator} refused: {:?}: {}", status.code(), status.message())
        }
        Err(_) => anyhow::bail!("the coordinator at {coordinator} did not answer within {FIRST_ANSWER_WITHIN:?}"),
    }
}

/// The first routing table of `watcher` that places every expert, within `within`; a wait longer
/// than a moment says on stderr how far placement has got.
pub async fn wait_for_placement(watcher: &TableWatcher, within: Duration) -> anyhow::Result<Arc<RoutingTableView>> {
    let placed = watcher.wait_for(RoutingTableView::is_complete, within);
    tokio::pin!(placed);
    if let Ok(placed) = tokio::time::timeout(QUIET_WAIT, &mut placed).await {
        return Ok(placed?);
    }
    let so_far = watcher.current().map_or_else(
        || "no routing table yet: none until its --min-workers workers have registered".to_owned(),
        |latest| {
            let (placed, experts) = latest.placed();
            format!("{placed} of {experts} experts placed on {} worker(s)", latest.workers().len())
        },
    );
    eprintln!("waiting up to {within:?} for the coordinator to place every expert ({so_far})");
    Ok(placed.await?)
}
