//! A bound on request bytes being received at once, across every connection.
//!
//! A request's bytes are buffered whole before they can be validated, so without a bound eight
//! invalid 500 MB requests held 3.4 GB of a worker at once. Each gRPC message of a `Forward` or
//! `ForwardStream` body here takes a share of [`Intake`]'s budget, as many KiB as its length
//! prefix announces, before its bytes are read: while the budget is spent, reading waits, and
//! HTTP/2 flow control holds the sender. A message larger than the whole budget is refused at
//! once. A message waits at most [`SHARE_WAIT`] for its share, then is refused
//! (RESOURCE_EXHAUSTED): the bytes of requests waiting on one HTTP/2 connection sit unread in its
//! flow-control window, and enough of them would starve the admitted request on the same
//! connection of window to finish in, so that nothing could ever be answered (eight 48 MiB
//! requests on one connection with a 64 MiB budget hung that way). The shares are held until the
//! messages are answered, since their rows stay in memory
//! until then: a unary request's with the request ([`Share`] dropped), a stream's one at a time as
//! its answers go out ([`Share::release_oldest`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Budget units: KiB, so that a `u32` count of permits covers any message size allowed.
const UNIT: u64 = 1024;

/// The longest a message waits for its share before it is refused.
pub const SHARE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The gRPC message prefix: a compression flag and a big-endian `u32` length.
const PREFIX: usize = 5;

/// The budget of request bytes a worker receives at once.
#[derive(Debug, Clone)]
pub struct Intake {
    budget: Arc<Semaphore>,
    units: u32,
}

/// The shares of one request body's messages, held while they are served.
#[derive(Debug, Default, Clone)]
pub struct Share(Arc<Mutex<VecDeque<OwnedSemaphorePermit>>>);

impl Share {
    /// Gives back the share of the body's oldest message still held: a stream's message was
    /// answered. Messages of one stream are about the same size (equal chunks), so which one's
    /// share goes back matters little; every share goes back when the last holder drops.
    pub fn release_oldest(&self) {
        self.permits().pop_front();
    }

    fn permits(&self) -> std::sync::MutexGuard<'_, VecDeque<OwnedSemaphorePermit>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Intake {
    pub fn new(bytes: u64) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Self { budget: Arc::new(Semaphore::new(units as usize)), units }
    }

    /// Request bytes that can be taken now.
    pub fn available_bytes(&self) -> u64 {
        self.budget.available_permits() as u64 * UNIT
    }

    /// `body`, reading each message's bytes past its gRPC length prefix only once that many bytes
    /// of the budget are taken; the shares go into `share`.
    pub fn meter<B>(&self, body: B, share: Share) -> Metered<B> {
        Metered {
            body,
            intake: self.clone(),
            share,
            state: State::Prefix(Vec::with_capacity(PREFIX)),
            unread: VecDeque::new(),
            trailers: None,
        }
    }
}

/// A body whose messages each wait for their share of the [`Intake`] budget.
pub struct Metered<B> {
    body: B,
    intake: Intake,
    share: Share,
    state: State,
    /// Data read from the body and not yet handed on: a frame may hold several messages, or the
    /// end of one and the start of the next.
    unread: VecDeque<Bytes>,
    /// Trailers read while data was still unread.
    trailers: Option<Frame<Bytes>>,
}

enum State {
    /// The prefix's bytes read so far.
    Prefix(Vec<u8>),
    /// Waiting for the share of a message of this many bytes.
    Waiting(BoxFuture<'static, Result<OwnedSemaphorePermit, Status>>, u64),
    /// The message's share is held; this many of its bytes are still to come.
    Message(u64),
}

impl<B> Metered<B> {
    /// What to do once a prefix is whole: wait for the message's share, or refuse it.
    fn admit(&mut self, prefix: &[u8]) -> Result<(), Status> {
        let length = u64::from(u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]));
        let units = length.div_ceil(UNIT).max(1);
        if units > u64::from(self.intake.units) {
            let budget = u64::from(self.intake.units) * UNIT;
            return Err(Status::resource_exhausted(format!(
                "a {length}-byte request is larger than the {budget} bytes this worker receives at once (--max-receiving-bytes)"
            )));
        }
        let budget = self.intake.budget.clone();
        let acquire = async move {
            match tokio::time::timeout(SHARE_WAIT, budget.acquire_many_owned(units as u32)).await {
                Ok(Ok(permit)) => Ok(permit),
                Ok(Err(_)) => Err(Status::unavailable("the worker is stopping")),
                Err(_) => Err(Status::resource_exhausted(format!(
                    "a {length}-byte request waited {SHARE_WAIT:?} for room: the worker is receiving as many request bytes as it takes at once (--max-receiving-bytes)"
                ))),
            }
        };
        self.state = State::Waiting(Box::pin(acquire), length);
        Ok(())
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            let this = &mut *self;
            if let State::Waiting(acquire, length) = &mut this.state {
                let permit = ready!(acquire.as_mut().poll(cx))?;
                this.share.permits().push_back(permit);
                this.state = State::Message(*length);
                continue;
            }
            let Some(mut data) = this.unread.pop_front() else {
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                    None => return Poll::Ready(None),
                    Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => this.unread.push_back(data),
                        Err(trailers) => this.trailers = Some(trailers),
                    },
                }
                continue;
            };
            if data.is_empty() {
                continue;
            }
            // Hand on the bytes of the part the state is in (a prefix, or the message's share),
            // keeping the rest for the next turn.
            let part = match &mut this.state {
                State::Prefix(prefix) => {
                    let wanted = (PREFIX - prefix.len()).min(data.len());
                    let part = data.split_to(wanted);
                    prefix.extend_from_slice(part.chunk());
                    if prefix.len() == PREFIX {
                        let prefix = std::mem::take(prefix);
                        this.admit(&prefix)?;
                    }
                    part
                }
                State::Message(remaining) => {
                    let taken = (*remaining).min(data.len() as u64);
                    *remaining -= taken;
                    let part = data.split_to(taken as usize);
                    if *remaining == 0 {
                        this.state = State::Prefix(Vec::with_capacity(PREFIX));
                    }
                    part
                }
                State::Waiting(..) => unreachable!("handled above"),
            };
            if !data.is_empty() {
                this.unread.push_front(data);
            }
            if !part.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.unread.is_empty() && self.trailers.is_none() && self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of ready frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn message(length: u32) -> Frames {
        let mut prefix = vec![0u8];
        prefix.extend(length.to_be_bytes());
        Frames(vec![Bytes::from(prefix), Bytes::from(vec![7u8; length as usize])].into())
    }

    async fn read_all<B: Body<Data = Bytes, Error = Status> + Unpin>(body: &mut B) -> Result<usize, Status> {
        let mut total = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            total += frame?.data_ref().map_or(0, Bytes::len);
        }
        Ok(total)
    }

    #[tokio::test]
    async fn a_body_waits_for_its_share_and_holds_it_until_released() {
        let intake = Intake::new(8 * 1024);
        let first = Share::default();
        let mut big = intake.meter(message(6 * 1024), first.clone());
        assert_eq!(read_all(&mut big).await.expect("fits"), 5 + 6 * 1024);
        assert_eq!(intake.available_bytes(), 2 * 1024, "held after the body is read");

        let mut second = intake.meter(message(4 * 1024), Share::default());
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(100), read_all(&mut second)).await;
        assert!(waiting.is_err(), "4 KiB more must wait while 6 of 8 are held");
        drop(first);
        drop(big);
        // Its prefix was read before it waited.
        assert_eq!(read_all(&mut second).await.expect("admitted once the first is answered"), 4 * 1024);
    }

    /// Messages of a stream, several to a frame or split across frames, each take their own
    /// share before their bytes are handed on; answering one gives its share back.
    #[tokio::test]
    async fn messages_of_a_stream_each_wait_for_their_share() {
        let intake = Intake::new(8 * 1024);
        let share = Share::default();
        let mut sent = Vec::new();
        for (length, fill) in [(3 * 1024u32, 1u8), (3 * 1024, 2), (3 * 1024, 3)] {
            sent.push(0u8);
            sent.extend(length.to_be_bytes());
            sent.extend(std::iter::repeat_n(fill, length as usize));
        }
        // One frame with the first message and the second's prefix cut after 2 bytes, then the rest.
        let cut = 5 + 3 * 1024 + 2;
        let frames = Frames(vec![Bytes::copy_from_slice(&sent[..cut]), Bytes::copy_from_slice(&sent[cut..])].into());
        let mut body = intake.meter(frames, share.clone());
        let mut received = Vec::new();
        let read_until_stalled = |body: &mut Metered<Frames>, received: &mut Vec<u8>| {
            let waker = futures::task::noop_waker();
            let mut context = Context::from_waker(&waker);
            while let Poll::Ready(Some(frame)) = Pin::new(&mut *body).poll_frame(&mut context) {
                received.extend_from_slice(frame.expect("data").data_ref().expect("data"));
            }
        };
        read_until_stalled(&mut body, &mut received);
        assert_eq!(received.len(), 2 * (5 + 3 * 1024) + 5, "two messages and the third's prefix, then a wait");
        assert_eq!(intake.available_bytes(), 0, "the third waits, holding what is left (tokio's fair queue)");
        share.release_oldest();
        read_until_stalled(&mut body, &mut received);
        assert_eq!(received, sent, "every byte, in order, once the first was answered");
        assert_eq!(intake.available_bytes(), 2 * 1024, "the second and third are held");
        drop((body, share));
        assert_eq!(intake.available_bytes(), 8 * 1024);
    }

    /// A message never waits without end: the bytes of waiting requests hold their connection's
    /// flow-control window, which the admitted one may need to finish.
    #[tokio::test(start_paused = true)]
    async fn a_message_that_cannot_get_its_share_in_time_is_refused() {
        let intake = Intake::new(8 * 1024);
        let mut held = intake.meter(message(6 * 1024), Share::default());
        read_all(&mut held).await.expect("fits");
        let started = tokio::time::Instant::now();
        let status = read_all(&mut intake.meter(message(4 * 1024), Share::default())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("waited 1s for room"), "{}", status.message());
        assert_eq!(started.elapsed(), SHARE_WAIT);
        assert_eq!(intake.available_bytes(), 2 * 1024, "a refused message holds nothing");
    }

    #[tokio::test]
    async fn a_message_larger_than_the_whole_budget_is_refused_at_once() {
        let intake = Intake::new(4 * 1024);
        let status = read_all(&mut intake.meter(message(5 * 1024), Share::default())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("larger than the 4096 bytes"), "{}", status.message());
        assert_eq!(intake.available_bytes(), 4 * 1024);
        let mut whole = intake.meter(message(4 * 1024), Share::default());
        assert_eq!(read_all(&mut whole).await.expect("the whole budget is not larger than it"), 5 + 4 * 1024);
    }

    /// The metered body ends when the body under it has and every byte it kept was handed on.
    #[tokio::test]
    async fn the_body_ends_once_every_byte_is_handed_on() {
        let intake = Intake::new(8 * 1024);
        let mut one_frame = vec![0u8];
        one_frame.extend(1024u32.to_be_bytes());
        one_frame.extend([7u8; 1024]);
        let mut body = intake.meter(Frames(vec![Bytes::from(one_frame)].into()), Share::default());
        assert!(!body.is_end_stream());
        let waker = futures::task::noop_waker();
        let mut context = Context::from_waker(&waker);
        let Poll::Ready(Some(Ok(prefix))) = Pin::new(&mut body).poll_frame(&mut context) else {
            panic!("the prefix is ready")
        };
        assert_eq!(prefix.data_ref().map(Bytes::len), Some(5));
        assert!(!body.is_end_stream(), "the frame's other bytes are kept, still to be handed on");
        assert_eq!(read_all(&mut body).await.expect("fits"), 1024);
        assert!(body.is_end_stream());
    }
}
