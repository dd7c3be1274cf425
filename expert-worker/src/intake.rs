//! A bound on request bytes being received at once, across every connection.
//!
//! A request's bytes are buffered whole before they can be validated, so without a bound eight
//! invalid 500 MB requests held 3.4 GB of a worker at once. Each `Forward` body here takes a share
//! of [`Intake`]'s budget, as many KiB as its gRPC length prefix announces, before more of it is
//! read: while the budget is spent, reading waits, and HTTP/2 flow control holds the sender. A
//! message larger than the whole budget is refused at once. The share is held until the request
//! is answered, since its rows stay in memory until then.

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

/// The budget of request bytes a worker receives at once.
#[derive(Debug, Clone)]
pub struct Intake {
    budget: Arc<Semaphore>,
    units: u32,
}

/// A request's share of the budget, held while it is served.
#[derive(Debug, Default, Clone)]
pub struct Share(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl Intake {
    pub fn new(bytes: u64) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Self { budget: Arc::new(Semaphore::new(units as usize)), units }
    }

    /// Request bytes that can be taken now.
    pub fn available_bytes(&self) -> u64 {
        self.budget.available_permits() as u64 * UNIT
    }

    /// `body`, reading past its gRPC length prefix only once that many bytes of the budget are
    /// taken; the share goes into `share`.
    pub fn meter<B>(&self, body: B, share: Share) -> Metered<B> {
        Metered { body, intake: self.clone(), share, state: State::Prefix(Vec::new()), pending: None }
    }
}

/// A body that waits for its share of the [`Intake`] budget.
pub struct Metered<B> {
    body: B,
    intake: Intake,
    share: Share,
    state: State,
    /// A frame read before the share was taken.
    pending: Option<Frame<Bytes>>,
}

enum State {
    /// The gRPC prefix's bytes read so far.
    Prefix(Vec<u8>),
    /// Waiting for the share.
    Waiting(BoxFuture<'static, Result<OwnedSemaphorePermit, tokio::sync::AcquireError>>),
    /// The share is held: the rest passes through.
    Admitted,
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
            match &mut this.state {
                State::Admitted => {
                    if let Some(frame) = this.pending.take() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    return Pin::new(&mut this.body).poll_frame(cx);
                }
                State::Waiting(acquire) => {
                    let permit =
                        ready!(acquire.as_mut().poll(cx)).map_err(|_| Status::unavailable("the worker is stopping"))?;
                    *this.share.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(permit);
                    this.state = State::Admitted;
                }
                State::Prefix(prefix) => {
                    let Some(frame) = ready!(Pin::new(&mut this.body).poll_frame(cx)) else {
                        this.state = State::Admitted;
                        continue;
                    };
                    let frame = frame?;
                    if let Some(data) = frame.data_ref() {
                        let wanted = 5usize.saturating_sub(prefix.len()).min(data.len());
                        prefix.extend_from_slice(&data.chunk()[..wanted]);
                    }
                    this.pending = Some(frame);
                    if prefix.len() < 5 {
                        // A prefix split over frames: hand this frame on and read the next.
                        return Poll::Ready(this.pending.take().map(Ok));
                    }
                    let length = u64::from(u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]));
                    let units = length.div_ceil(UNIT).max(1);
                    if units > u64::from(this.intake.units) {
                        let budget = u64::from(this.intake.units) * UNIT;
                        return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                            "a {length}-byte request is larger than the {budget} bytes this worker receives at once (--max-receiving-bytes)"
                        )))));
                    }
                    let acquire = this.intake.budget.clone().acquire_many_owned(units as u32);
                    this.state = State::Waiting(Box::pin(acquire));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && matches!(self.state, State::Admitted) && self.body.is_end_stream()
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
        assert_eq!(read_all(&mut second).await.expect("admitted once the first is answered"), 5 + 4 * 1024);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_whole_budget_is_refused_at_once() {
        let intake = Intake::new(4 * 1024);
        let status = read_all(&mut intake.meter(message(5 * 1024), Share::default())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("larger than the 4096 bytes"), "{}", status.message());
        assert_eq!(intake.available_bytes(), 4 * 1024);
    }
}
