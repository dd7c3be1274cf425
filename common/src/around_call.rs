//! The one shape of the server layers that act around each call (metrics, panics, deadlines,
//! roles): each says in [`AroundCall::around`] what it reads from a call and what it does with its
//! answer, and [`CallLayer`] makes it a tower layer over any gRPC service.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http::{Request, Response};

/// A call's answer: its head, and a body whose end carries the status.
pub type Answer = Response<tonic::body::Body>;

/// A call's answer as it comes, or the services' error.
pub type Answered<E> = BoxFuture<'static, Result<Answer, E>>;

/// What a server layer does around each call.
pub trait AroundCall: Clone {
    /// Hands `request` to `handle` (the services inside) and returns the call's answer, built
    /// around the one `handle` returns.
    fn around<B, E: 'static>(&self, request: Request<B>, handle: impl FnOnce(Request<B>) -> Answered<E>)
    -> Answered<E>;
}

/// `A` as a tower layer, for `Server::layer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallLayer<A>(pub A);

impl<S, A: AroundCall> tower::Layer<S> for CallLayer<A> {
    type Service = CallService<S, A>;

    fn layer(&self, inner: S) -> CallService<S, A> {
        CallService { inner, around: self.0.clone() }
    }
}

/// See [`CallLayer`].
#[derive(Debug, Clone)]
pub struct CallService<S, A> {
    inner: S,
    around: A,
}

impl<S, A, B> tower::Service<Request<B>> for CallService<S, A>
where
    S: tower::Service<Request<B>, Response = Answer>,
    S::Future: Send + 'static,
    S::Error: 'static,
    A: AroundCall,
{
    type Response = Answer;
    type Error = S::Error;
    type Future = Answered<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.around.around(request, |request| Box::pin(self.inner.call(request)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service};

    use super::*;

    /// A service that is never ready (its queue full, say).
    struct Busy;

    impl Service<Request<()>> for Busy {
        type Response = Answer;
        type Error = Infallible;
        type Future = Answered<Infallible>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Pending
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            unreachable!("never ready")
        }
    }

    #[derive(Clone)]
    struct PassThrough;

    impl AroundCall for PassThrough {
        fn around<B, E: 'static>(
            &self,
            request: Request<B>,
            handle: impl FnOnce(Request<B>) -> Answered<E>,
        ) -> Answered<E> {
            handle(request)
        }
    }

    #[test]
    fn a_layer_is_ready_only_when_the_services_inside_are() {
        let mut service = CallLayer(PassThrough).layer(Busy);
        let mut context = Context::from_waker(std::task::Waker::noop());
        assert!(service.poll_ready(&mut context).is_pending());
    }
}
