//! The all-to-all exchange of one layer call, as Quickwit's ingest router does it: every request in
//! flight at once (`FuturesUnordered`), each with its own deadline; every answer handed to the
//! caller as it arrives, so combining starts before the slowest worker answers; the first failure
//! ends the call at once, abandoning what is still in flight; one typed outcome per destination.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::dispatch::PlannedRequest;
use crate::error::ClientError;
use crate::transport::{Answer, Endpoint, ExpertTransport};

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
    /// Requests sent to it in this call.
    pub requests: usize,
    pub outcome: Outcome,
}

/// A call that failed at one destination, with what became of every destination.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeFailure {
    /// The first failure.
    pub error: ClientError,
    pub outcomes: Vec<DestinationOutcome>,
}

/// Sends every request of `requests` over `transport` at once, each with `deadline`, and hands each
/// answer with its request's index to `on_answer` as it arrives. Returns the outcome of every
/// destination, or at the first failure (a transport error, a timeout, or `on_answer` refusing the
/// answer) returns that failure without waiting for the requests still in flight.
pub async fn run(
    transport: &dyn ExpertTransport,
    requests: &[PlannedRequest],
    deadline: Duration,
    mut on_answer: impl FnMut(usize, Answer) -> Result<(), ClientError>,
) -> Result<Vec<DestinationOutcome>, ExchangeFailure> {
    let mut outcomes: Vec<DestinationOutcome> = Vec::new();
    let mut destination_of = Vec::with_capacity(requests.len());
    let mut pending_per_destination: Vec<usize> = Vec::new();
    for planned in requests {
        let index = match outcomes.iter().position(|outcome| outcome.endpoint == planned.endpoint) {
            Some(index) => index,
            None => {
                outcomes.push(DestinationOutcome {
                    endpoint: planned.endpoint.clone(),
                    requests: 0,
                    outcome: Outcome::Abandoned,
                });
                pending_per_destination.push(0);
                outcomes.len() - 1
            }
        };
        outcomes[index].requests += 1;
        pending_per_destination[index] += 1;
        destination_of.push(index);
    }
    let mut in_flight: FuturesUnordered<_> = requests
        .iter()
        .enumerate()
        .map(|(index, planned)| {
            let sent = transport.forward(&planned.endpoint, planned.request.clone(), deadline);
            let endpoint = planned.endpoint.clone();
            async move {
                let answer = match tokio::time::timeout(deadline, sent).await {
                    Ok(answer) => answer,
                    Err(_) => Err(ClientError::Timeout { endpoint: endpoint.to_string(), after: deadline }),
                };
                (index, answer)
            }
        })
        .collect();
    while let Some((index, answer)) = in_flight.next().await {
        let destination = destination_of[index];
        if let Err(error) = answer.and_then(|answer| on_answer(index, answer)) {
            outcomes[destination].outcome = Outcome::Failed(error.clone());
            return Err(ExchangeFailure { error, outcomes });
        }
        pending_per_destination[destination] -= 1;
        if pending_per_destination[destination] == 0 {
            outcomes[destination].outcome = Outcome::Answered;
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::future::BoxFuture;
    use switchyard_proto::v1;

    use super::*;
    use crate::ledger::RpcTiming;

    /// A transport whose destinations answer after a fixed (virtual) delay, fail at once, or never.
    #[derive(Debug)]
    struct Scripted {
        behaviours: Vec<(&'static str, Behaviour)>,
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
            let behaviour = self.behaviours.iter().find(|(name, _)| **name == **endpoint).map(|(_, b)| *b);
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
    }

    fn request(endpoint: &str, id: u64) -> PlannedRequest {
        PlannedRequest {
            endpoint: Arc::from(endpoint),
            request: v1::ForwardRequest { request_id: id, ..Default::default() },
            pieces: Vec::new(),
            token_major: None,
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
        let transport = Scripted {
            behaviours: vec![("fast", Behaviour::FailAfter(Duration::from_millis(5))), ("slow", Behaviour::Never)],
        };
        let requests = [request("slow", 1), request("fast", 2), request("slow", 3)];
        let started = tokio::time::Instant::now();
        let failure = run(&transport, &requests, Duration::from_secs(3600), |_, _| Ok(())).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        assert!(matches!(failure.error, ClientError::Worker { ref endpoint, .. } if endpoint == "fast"));
        assert_eq!(state(&failure.outcomes), [("slow", 2, "abandoned"), ("fast", 1, "failed")]);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_handed_over_as_they_arrive_and_every_destination_answers() {
        let transport = Scripted {
            behaviours: vec![
                ("a", Behaviour::AnswerAfter(Duration::from_millis(30))),
                ("b", Behaviour::AnswerAfter(Duration::from_millis(10))),
            ],
        };
        let requests = [request("a", 1), request("b", 2), request("b", 3)];
        let mut arrivals = Vec::new();
        let outcomes = run(&transport, &requests, Duration::from_secs(1), |index, answer| {
            arrivals.push((index, answer.response.request_id));
            Ok(())
        })
        .await
        .expect("every destination answers");
        assert_eq!(arrivals.len(), 3);
        assert_eq!(arrivals[2], (0, 1), "the slow destination's answer comes last");
        assert_eq!(state(&outcomes), [("a", 1, "answered"), ("b", 2, "answered")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_past_its_deadline_fails_by_name_and_a_refused_answer_fails_the_call() {
        let transport = Scripted {
            behaviours: vec![("late", Behaviour::Never), ("ok", Behaviour::AnswerAfter(Duration::from_millis(1)))],
        };
        let failure =
            run(&transport, &[request("late", 1)], Duration::from_millis(50), |_, _| Ok(())).await.unwrap_err();
        assert_eq!(failure.error, ClientError::Timeout { endpoint: "late".into(), after: Duration::from_millis(50) });
        let refused = ClientError::BadResponse { endpoint: "ok".into(), reason: "outputs[0] is missing".into() };
        let failure = run(&transport, &[request("ok", 1)], Duration::from_secs(1), |_, _| Err(refused.clone()))
            .await
            .unwrap_err();
        assert_eq!((failure.error, state(&failure.outcomes)), (refused, vec![("ok", 1, "failed")]));
    }
}
