//! The all-to-all exchange of one round of a layer call, as Quickwit's ingest router does it: every
//! request in flight at once (`FuturesUnordered`), each with its own deadline; every answer handed
//! to the caller as it arrives, so combining starts before the slowest worker answers. A
//! destination that fails with a retryable error is given up at once (its requests still in flight
//! are abandoned, and handed back to be sent elsewhere) while the others carry on; any other
//! failure ends the round at once. One typed outcome per destination.

use std::collections::HashSet;
use std::time::Duration;

use futures::stream::StreamExt;

use crate::dispatch::PlannedRequest;
use crate::error::ClientError;
use crate::replicas::Replicas;
use crate::transport::{Answer, ChunkAnswers, Endpoint, ExpertTransport};

/// What became of one destination's requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every request to it was answered (and its answers accepted).
    Answered,
    /// It failed: the transport's error, a timeout, or an answer the caller refused.
    Failed(ClientError),
    /// Still in flight when another destination failed; its requests were dropped.
    Abandoned,
}

/// One destination (worker) of a call and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationOutcome {
    pub endpoint: Endpoint,
    /// Requests sent to it in this round.
    pub requests: usize,
    pub outcome: Outcome,
}

/// A round in which every destination either answered or failed in a way worth retrying.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub outcomes: Vec<DestinationOutcome>,
    /// Indices of the requests whose destination failed (retryably) before answering them.
    pub unanswered: Vec<usize>,
}

impl Round {
    /// The destinations that failed, and why.
    pub fn failures(&self) -> impl Iterator<Item = (&Endpoint, &ClientError)> {
        self.outcomes.iter().filter_map(|destination| match &destination.outcome {
            Outcome::Failed(error) => Some((&destination.endpoint, error)),
            _ => None,
        })
    }
}

/// A round that failed at one destination in a way no retry mends, with what became of every
/// destination.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeFailure {
    /// The first failure.
    pub error: ClientError,
    pub outcomes: Vec<DestinationOutcome>,
}

/// Sends every request of `requests` over `transport` at once (the chunks of one stream in order,
/// as one `forward_chunks`), each stream with `deadline`, and hands each
/// answer with its request's index to `on_answer` as it arrives. A destination failing with an
/// error `retryable` accepts is given up without waiting for its other requests; they are returned
/// as unanswered. Any other failure (or `on_answer` refusing an answer) returns at once, without
/// waiting for the requests still in flight. `replicas` counts each request while it is in flight.
pub async fn run(
    transport: &dyn ExpertTransport,
    replicas: &Replicas,
    requests: &[PlannedRequest],
    deadline: Duration,
    retryable: impl Fn(&ClientError) -> bool,
    mut on_answer: impl FnMut(usize, Answer) -> Result<(), ClientError>,
) -> Result<Round, ExchangeFailure> {
    let (mut outcomes, destination_of, mut pending_per_destination) = destinations(requests);
    let mut counted: Vec<Option<_>> =
        requests.iter().map(|planned| Some(replicas.start(&planned.endpoint, planned.assignments()))).collect();
    let mut in_flight = futures::stream::select_all(streams(requests).into_iter().map(|(endpoint, members)| {
        let chunks = members.iter().map(|&index| requests[index].request.clone()).collect();
        let answers = transport.forward_chunks(endpoint, chunks, deadline);
        within(deadline, endpoint.clone(), members.len(), answers)
            .map(move |(position, answer)| (members[position], answer))
    }));
    let mut resolved = vec![false; requests.len()];
    let mut given_up: HashSet<usize> = HashSet::new();
    let mut unanswered = Vec::new();
    let mut open = requests.len();
    while open > 0 {
        let Some((index, answer)) = in_flight.next().await else { break };
        counted[index] = None;
        let destination = destination_of[index];
        if given_up.contains(&destination) {
            continue;
        }
        resolved[index] = true;
        open -= 1;
        let accepted = match answer {
            Ok(answer) => on_answer(index, answer),
            Err(error) if retryable(&error) => {
                outcomes[destination].outcome = Outcome::Failed(error);
                given_up.insert(destination);
                for (other, _) in destination_of.iter().enumerate().filter(|(_, d)| **d == destination) {
                    if other == index || !resolved[other] {
                        unanswered.push(other);
                    }
                    if !resolved[other] {
                        resolved[other] = true;
                        open -= 1;
                    }
                }
                continue;
            }
            Err(error) => Err(error),
        };
        if let Err(error) = accepted {
            outcomes[destination].outcome = Outcome::Failed(error.clone());
            return Err(ExchangeFailure { error, outcomes });
        }
        pending_per_destination[destination] -= 1;
        if pending_per_destination[destination] == 0 {
            outcomes[destination].outcome = Outcome::Answered;
        }
    }
    unanswered.sort_unstable();
    Ok(Round { outcomes, unanswered })
}

/// One outcome per destination worker (abandoned until it answers or fails), each request's
/// destination, and how many requests each destination has.
fn destinations(requests: &[PlannedRequest]) -> (Vec<DestinationOutcome>, Vec<usize>, Vec<usize>) {
    let mut outcomes: Vec<DestinationOutcome> = Vec::new();
    let mut destination_of = Vec::with_capacity(requests.len());
    let mut requests_per_destination: Vec<usize> = Vec::new();
    for planned in requests {
        let index = match outcomes.iter().position(|outcome| outcome.endpoint == planned.endpoint) {
            Some(index) => index,
            None => {
                outcomes.push(DestinationOutcome {
                    endpoint: planned.endpoint.clone(),
                    requests: 0,
                    outcome: Outcome::Abandoned,
                });
                requests_per_destination.push(0);
                outcomes.len() - 1
            }
        };
        outcomes[index].requests += 1;
        requests_per_destination[index] += 1;
        destination_of.push(index);
    }
    (outcomes, destination_of, requests_per_destination)
}

/// The requests of each (worker, stream), by index and in order: the chunks of one payload go
/// together on one stream.
fn streams(requests: &[PlannedRequest]) -> Vec<(&Endpoint, Vec<usize>)> {
    let mut streams: Vec<(&Endpoint, usize, Vec<usize>)> = Vec::new();
    for (index, planned) in requests.iter().enumerate() {
        match streams
            .iter_mut()
            .find(|(endpoint, stream, _)| **endpoint == planned.endpoint && *stream == planned.stream)
        {
            Some((_, _, members)) => members.push(index),
            None => streams.push((&planned.endpoint, planned.stream, vec![index])),
        }
    }
    streams.into_iter().map(|(endpoint, _, members)| (endpoint, members)).collect()
}

/// `answers` of `count` chunks, the first unanswered failing with a timeout once `deadline` has
/// passed (the exchange then gives up or fails their destination).
fn within(deadline: Duration, endpoint: Endpoint, count: usize, answers: ChunkAnswers) -> ChunkAnswers {
    let expired = Box::pin(tokio::time::sleep(deadline));
    let state = (answers, expired, vec![false; count], false);
    futures::stream::unfold(state, move |(mut answers, mut expired, mut answered, ended)| {
        let endpoint = endpoint.clone();
        async move {
            if ended {
                return None;
            }
            tokio::select! {
                next = answers.next() => {
                    let (position, answer) = next?;
                    answered[position] = true;
                    Some(((position, answer), (answers, expired, answered, false)))
                }
                () = &mut expired => {
                    let position = answered.iter().position(|done| !done)?;
                    let timeout = ClientError::Timeout { endpoint: endpoint.to_string(), after: deadline };
                    Some(((position, Err(timeout)), (answers, expired, answered, true)))
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::future::BoxFuture;
    use switchyard_proto::v1;

    use super::*;
    use crate::ledger::RpcTiming;

    const NEVER_RETRY: fn(&ClientError) -> bool = |_| false;

    /// A transport whose destinations answer after a fixed (virtual) delay, fail at once, or never
    /// (a request id in `by_request` behaves its own way), and which records each stream's chunks.
    #[derive(Debug, Default)]
    struct Scripted {
        behaviours: Vec<(&'static str, Behaviour)>,
        by_request: Vec<(u64, Behaviour)>,
        /// Each `forward_chunks` call: its endpoint and its requests' ids, in order.
        streams: std::sync::Mutex<Vec<(String, Vec<u64>)>>,
    }

    impl Scripted {
        fn new(behaviours: Vec<(&'static str, Behaviour)>) -> Self {
            Self { behaviours, ..Self::default() }
        }

        fn behaviour(&self, endpoint: &Endpoint, request_id: u64) -> Option<Behaviour> {
            let own = self.by_request.iter().find(|(id, _)| *id == request_id).map(|(_, behaviour)| *behaviour);
            own.or_else(|| {
                self.behaviours.iter().find(|(name, _)| **name == **endpoint).map(|(_, behaviour)| *behaviour)
            })
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Behaviour {
        AnswerAfter(Duration),
        FailAfter(Duration),
        Never,
    }

    impl ExpertTransport for Scripted {
        fn forward(
            &self,
            endpoint: &Endpoint,
            request: v1::ForwardRequest,
            _deadline: Duration,
        ) -> BoxFuture<'static, Result<Answer, ClientError>> {
            let behaviour = self.behaviour(endpoint, request.request_id);
            let endpoint = endpoint.to_string();
            Box::pin(async move {
                match behaviour {
                    Some(Behaviour::AnswerAfter(delay)) => {
                        tokio::time::sleep(delay).await;
                        let response = v1::ForwardResponse { request_id: request.request_id, ..Default::default() };
                        let timing = RpcTiming { elapsed: delay, sent_unix_nanos: 0, answered_unix_nanos: 0 };
                        Ok(Answer { response, timing })
                    }
                    Some(Behaviour::FailAfter(delay)) => {
                        tokio::time::sleep(delay).await;
                        Err(ClientError::Worker { endpoint, code: tonic::Code::Unavailable, message: "down".into() })
                    }
                    Some(Behaviour::Never) | None => std::future::pending().await,
                }
            })
        }

        fn forward_chunks(
            &self,
            endpoint: &Endpoint,
            requests: Vec<v1::ForwardRequest>,
            deadline: Duration,
        ) -> ChunkAnswers {
            let ids = requests.iter().map(|request| request.request_id).collect();
            self.streams.lock().unwrap().push((endpoint.to_string(), ids));
            crate::transport::forward_each(self, endpoint, requests, deadline)
        }
    }

    fn request(endpoint: &str, id: u64) -> PlannedRequest {
        PlannedRequest {
            endpoint: Arc::from(endpoint),
            request: v1::ForwardRequest { request_id: id, ..Default::default() },
            pieces: Vec::new(),
            token_major: None,
            stream: 0,
        }
    }

    fn state(outcomes: &[DestinationOutcome]) -> Vec<(&str, usize, &'static str)> {
        outcomes
            .iter()
            .map(|outcome| {
                let state = match outcome.outcome {
                    Outcome::Answered => "answered",
                    Outcome::Failed(_) => "failed",
                    Outcome::Abandoned => "abandoned",
                };
                (&*outcome.endpoint, outcome.requests, state)
            })
            .collect()
    }

    /// The failing destination ends the call while the slow one is still in flight: the clock
    /// (paused, so virtual and exact) shows the call took the failure's time, not the slow one's.
    #[tokio::test(start_paused = true)]
    async fn a_failure_ends_the_call_without_waiting_for_the_slow_destination() {
        let transport =
            Scripted::new(vec![("fast", Behaviour::FailAfter(Duration::from_millis(5))), ("slow", Behaviour::Never)]);
        let requests = [request("slow", 1), request("fast", 2), request("slow", 3)];
        let started = tokio::time::Instant::now();
        let failure =
            run(&transport, &Replicas::default(), &requests, Duration::from_secs(3600), NEVER_RETRY, |_, _| Ok(()))
                .await
                .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert!(matches!(failure.error, ClientError::Worker { ref endpoint, .. } if endpoint == "fast"));
        assert_eq!(state(&failure.outcomes), [("slow", 2, "abandoned"), ("fast", 1, "failed")]);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_handed_over_as_they_arrive_and_every_destination_answers() {
        let transport = Scripted::new(vec![
            ("a", Behaviour::AnswerAfter(Duration::from_millis(30))),
            ("b", Behaviour::AnswerAfter(Duration::from_millis(10))),
        ]);
        let requests = [request("a", 1), request("b", 2), request("b", 3)];
        let mut arrivals = Vec::new();
        let outcomes =
            run(&transport, &Replicas::default(), &requests, Duration::from_secs(1), NEVER_RETRY, |index, answer| {
                arrivals.push((index, answer.response.request_id));
                Ok(())
            })
            .await
            .expect("every destination answers");
        assert_eq!(arrivals.len(), 3);
        assert_eq!(arrivals[2], (0, 1), "the slow destination's answer comes last");
        assert_eq!(state(&outcomes.outcomes), [("a", 1, "answered"), ("b", 2, "answered")]);
        assert!(outcomes.unanswered.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_past_its_deadline_fails_by_name_and_a_refused_answer_fails_the_call() {
        let transport =
            Scripted::new(vec![("late", Behaviour::Never), ("ok", Behaviour::AnswerAfter(Duration::from_millis(1)))]);
        let failure = run(
            &transport,
            &Replicas::default(),
            &[request("late", 1)],
            Duration::from_millis(50),
            NEVER_RETRY,
            |_, _| Ok(()),
        )
        .await
        .unwrap_err();
        assert_eq!(failure.error, ClientError::Timeout { endpoint: "late".into(), after: Duration::from_millis(50) });
        let refused = ClientError::BadResponse { endpoint: "ok".into(), reason: "outputs[0] is missing".into() };
        let failure = run(
            &transport,
            &Replicas::default(),
            &[request("ok", 1)],
            Duration::from_secs(1),
            |_| true,
            |_, _| Err(refused.clone()),
        )
        .await
        .unwrap_err();
        assert_eq!((failure.error, state(&failure.outcomes)), (refused, vec![("ok", 1, "failed")]));
    }

    /// A worker failing retryably is given up at once: its request still in flight comes back
    /// unanswered with the failed one, and the other worker's answers are all taken.
    #[tokio::test(start_paused = true)]
    async fn a_retryable_failure_gives_up_that_worker_only_and_hands_back_its_requests() {
        let transport = Scripted::new(vec![
            ("down", Behaviour::FailAfter(Duration::from_millis(5))),
            ("stalled", Behaviour::Never),
            ("ok", Behaviour::AnswerAfter(Duration::from_millis(20))),
        ]);
        let requests = [request("down", 1), request("ok", 2), request("down", 3), request("ok", 4)];
        let mut answered = Vec::new();
        let started = tokio::time::Instant::now();
        let round = run(
            &transport,
            &Replicas::default(),
            &requests,
            Duration::from_secs(60),
            |_| true,
            |index, _| {
                answered.push(index);
                Ok(())
            },
        )
        .await
        .expect("a retryable failure does not fail the round");
        assert_eq!(started.elapsed(), Duration::from_millis(20), "no wait for the failed worker's other request");
        assert_eq!(round.unanswered, [0, 2]);
        answered.sort_unstable();
        assert_eq!(answered, [1, 3]);
        assert_eq!(state(&round.outcomes), [("down", 2, "failed"), ("ok", 2, "answered")]);
        assert_eq!(round.failures().map(|(endpoint, _)| &**endpoint).collect::<Vec<_>>(), ["down"]);
        let stalled = [request("stalled", 5), request("ok", 6)];
        let round =
            run(&transport, &Replicas::default(), &stalled, Duration::from_millis(100), |_| true, |_, _| Ok(()))
                .await
                .expect("a timeout is retryable here");
        assert_eq!(round.unanswered, [0], "the stalled worker's request comes back after the attempt's deadline");
    }

    fn on_stream(endpoint: &str, id: u64, stream: usize) -> PlannedRequest {
        PlannedRequest { stream, ..request(endpoint, id) }
    }

    /// Requests to one worker with the same stream number go as the chunks of one stream, in
    /// order; another stream number, or another worker, is a stream of its own.
    #[tokio::test(start_paused = true)]
    async fn the_chunks_of_one_stream_go_together_and_other_streams_apart() {
        let transport = Scripted::new(vec![
            ("a", Behaviour::AnswerAfter(Duration::from_millis(1))),
            ("b", Behaviour::AnswerAfter(Duration::from_millis(1))),
        ]);
        let requests = [on_stream("a", 1, 0), on_stream("a", 2, 1), on_stream("b", 3, 0), on_stream("a", 4, 0)];
        let mut answered = Vec::new();
        let round =
            run(&transport, &Replicas::default(), &requests, Duration::from_secs(1), NEVER_RETRY, |index, _| {
                answered.push(index);
                Ok(())
            })
            .await
            .expect("every stream answers");
        let streams = transport.streams.lock().unwrap().clone();
        let expected = [("a", vec![1, 4]), ("a", vec![2]), ("b", vec![3])];
        assert_eq!(streams, expected.map(|(endpoint, ids)| (endpoint.to_string(), ids)));
        answered.sort_unstable();
        assert_eq!(answered, [0, 1, 2, 3], "each answer is handed over with its own request's index");
        assert_eq!(state(&round.outcomes), [("a", 3, "answered"), ("b", 1, "answered")]);
    }

    /// Once a worker has failed retryably, its streams still in flight are not waited for: the
    /// round ends when the other workers have answered, not at the stalled stream's deadline.
    #[tokio::test(start_paused = true)]
    async fn a_given_up_worker_s_other_streams_are_not_waited_for() {
        let transport = Scripted {
            behaviours: vec![("ok", Behaviour::AnswerAfter(Duration::from_millis(20)))],
            by_request: vec![(1, Behaviour::FailAfter(Duration::from_millis(5))), (2, Behaviour::Never)],
            ..Scripted::default()
        };
        let requests = [on_stream("down", 1, 0), on_stream("down", 2, 1), on_stream("ok", 3, 0)];
        let started = tokio::time::Instant::now();
        let round = run(&transport, &Replicas::default(), &requests, Duration::from_secs(60), |_| true, |_, _| Ok(()))
            .await
            .expect("a retryable failure does not fail the round");
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert_eq!(round.unanswered, [0, 1]);
        assert_eq!(state(&round.outcomes), [("down", 2, "failed"), ("ok", 1, "answered")]);
    }
}
