//! A coordinator for the tests of its clients (a worker's membership, a router's table watcher):
//! it answers each call with the next scripted answer of its kind, or a healthy one once the
//! script runs out, and reports every call it was asked, in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use switchyard_proto::v1;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// What the scripted coordinator answers, call kind by call kind. Past the script: registration
/// succeeds as worker `w-1` with 10 ms heartbeats, heartbeats find the worker placed with
/// everything loaded, drains find no route left, and a watch gets an open stream of no tables.
#[derive(Default)]
pub struct Script {
    pub registrations: VecDeque<Result<v1::RegisterWorkerResponse, Status>>,
    pub heartbeats: VecDeque<Result<v1::HeartbeatResponse, Status>>,
    pub drains: VecDeque<Result<v1::DrainWorkerResponse, Status>>,
    pub watches: VecDeque<Watch>,
}

/// How one `WatchRoutingTable` call is answered.
pub enum Watch {
    /// With this status instead of a stream.
    Refused(Status),
    /// With a stream of these items that then ends (`open: false`) or stays open.
    Streams { items: Vec<Result<v1::RoutingTable, Status>>, open: bool },
}

/// A call the scripted coordinator was asked.
#[derive(Debug, PartialEq)]
pub enum Asked {
    Register { name: String, endpoint: String },
    Heartbeat { worker_id: String },
    Drain { worker_id: String },
    Watch { newer_than: u64, epoch: u64 },
}

/// The scripted coordinator serving `script` on a port of 127.0.0.1 for as long as the runtime
/// runs: its address, and what it was asked, in order.
pub async fn serve(script: Script) -> (String, mpsc::UnboundedReceiver<Asked>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a port of 127.0.0.1");
    let address = format!("http://{}", listener.local_addr().expect("bound"));
    let (asked, requests) = mpsc::unbounded_channel();
    let coordinator = ScriptedCoordinator { script: Mutex::new(script), asked };
    let server = crate::transport::server()
        .add_service(v1::coordinator_server::CoordinatorServer::new(coordinator))
        .serve_with_incoming(crate::transport::incoming(listener));
    tokio::spawn(server);
    (address, requests)
}

struct ScriptedCoordinator {
    script: Mutex<Script>,
    asked: mpsc::UnboundedSender<Asked>,
}

impl ScriptedCoordinator {
    /// Reports `asked` and answers with what `pick` takes from the script, or `past_the_script`.
    fn next<T>(
        &self,
        asked: Asked,
        pick: impl FnOnce(&mut Script) -> Option<Result<T, Status>>,
        past_the_script: T,
    ) -> Result<Response<T>, Status> {
        // A test that stopped listening no longer cares what was asked.
        let _ = self.asked.send(asked);
        let answer = pick(&mut self.script.lock().expect("not poisoned")).unwrap_or(Ok(past_the_script));
        answer.map(Response::new)
    }
}

type Tables = Pin<Box<dyn Stream<Item = Result<v1::RoutingTable, Status>> + Send>>;

#[tonic::async_trait]
impl v1::coordinator_server::Coordinator for ScriptedCoordinator {
    type WatchRoutingTableStream = Tables;

    async fn register_worker(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let request = request.into_inner();
        let asked = Asked::Register { name: request.name, endpoint: request.endpoint };
        let registered = v1::RegisterWorkerResponse { worker_id: "w-1".into(), heartbeat_interval_ms: 10 };
        self.next(asked, |script| script.registrations.pop_front(), registered)
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let asked = Asked::Heartbeat { worker_id: request.into_inner().worker_id };
        let placed = v1::HeartbeatResponse { placed: true, experts_to_load: 0, ..Default::default() };
        self.next(asked, |script| script.heartbeats.pop_front(), placed)
    }

    async fn drain_worker(
        &self,
        request: Request<v1::DrainWorkerRequest>,
    ) -> Result<Response<v1::DrainWorkerResponse>, Status> {
        let asked = Asked::Drain { worker_id: request.into_inner().worker_id };
        self.next(asked, |script| script.drains.pop_front(), v1::DrainWorkerResponse::default())
    }

    async fn watch_routing_table(
        &self,
        request: Request<v1::GetRoutingTableRequest>,
    ) -> Result<Response<Tables>, Status> {
        let request = request.into_inner();
        let _ = self.asked.send(Asked::Watch { newer_than: request.newer_than, epoch: request.epoch });
        let watch = self.script.lock().expect("not poisoned").watches.pop_front();
        let (items, open) = match watch {
            Some(Watch::Refused(status)) => return Err(status),
            Some(Watch::Streams { items, open }) => (items, open),
            None => (Vec::new(), true),
        };
        let items = futures::stream::iter(items);
        let tables: Tables = if open { Box::pin(items.chain(futures::stream::pending())) } else { Box::pin(items) };
        Ok(Response::new(tables))
    }

    async fn get_routing_table(
        &self,
        _: Request<v1::GetRoutingTableRequest>,
    ) -> Result<Response<v1::RoutingTable>, Status> {
        Err(Status::unimplemented("scripted coordinator"))
    }

    async fn get_cluster_status(
        &self,
        _: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Err(Status::unimplemented("scripted coordinator"))
    }
}
