//! A request's body is read to its end before its answer leaves ([`read_to_end`]),
//! whatever answered it: a body over the limit refused with 413, a request refused by
//! the guard (401, 403, 415, 429) before anything read its body.
//!
//! Why: many clients write their whole request before they read anything (Python's
//! urllib, most scripts, curl over HTTP/2 until its upload is done). A server that
//! answers early and then closes the connection with part of the body unread makes the
//! kernel reset it: the client's next write fails, and it never reads the answer. hyper
//! reads what has already arrived of an unread body and closes the connection if that
//! was not all of it; Caddy, in front, then sees Orion's answer as a failed proxy write
//! (503 to the client, and Orion marked down for its `fail_duration`) and closes the
//! client's connection the same way. So the rest of an unread body is read here and
//! thrown away, in the body's own frames (nothing is kept), up to [`DRAIN_BOUND`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, EXPECT};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as _, Bytes, Frame, SizeHint};

use super::{ApiError, BODY_LIMIT};

/// Most bytes of one request's body read before its answer leaves: 256 times
/// [`BODY_LIMIT`]. A client that sent a wrong file, a log, an image by mistake still gets
/// its 413 (such mistakes are rarely bigger); reading 16 MiB and throwing it away costs
/// Orion a few milliseconds on the proxy's network and no memory, and a client gains
/// nothing by sending more that it could not get by sending more requests. Past it the
/// answer leaves at once, saying `Connection: close`, and the connection is closed
/// [`LINGER`] later: a client that writes before it reads may then see a reset instead.
/// Caddy refuses a body announced over it (caddy/Caddyfile).
pub const DRAIN_BOUND: u64 = 16 * 1024 * 1024;

/// How long a body over [`DRAIN_BOUND`] is still read (and at most [`DRAIN_BOUND`] bytes
/// more) after its answer left, before its connection is closed: long enough for the
/// answer to reach Caddy ahead of the close. Closed at once, the connection would be
/// reset under Caddy's copy of the body, and Caddy would take that for Orion failing:
/// 503 to the client, and Orion marked down for everyone for its `fail_duration`. Go's
/// HTTP server waits 500 ms for the same reason.
const LINGER: Duration = Duration::from_secs(1);

/// Passes the request on with its body shared, then reads what is left of the body (up
/// to [`DRAIN_BOUND`]) before the answer is returned. Bodies that cannot be answered
/// better by reading them are refused at once, with `Connection: close`: one announced
/// over [`DRAIN_BOUND`], and one announced over [`BODY_LIMIT`] by a client that waits
/// for `100 Continue` before sending it (it gets its 413 having sent nothing).
pub(super) async fn read_to_end(req: Request, next: Next) -> Response {
    let announced = announced_length(req.headers());
    if announced.is_some_and(|length| length > BODY_LIMIT as u64)
        && req.headers().contains_key(EXPECT)
    {
        return closing(too_large());
    }
    let (parts, body) = req.into_parts();
    let shared = Shared::new(body);
    if announced.is_some_and(|length| length > DRAIN_BOUND) {
        shared.linger();
        return closing(too_large());
    }
    let response = next
        .run(Request::from_parts(parts, Body::new(shared.clone())))
        .await;
    match shared.drain(DRAIN_BOUND).await {
        Drained::ToItsEnd => response,
        Drained::Failed => closing(response),
        Drained::PastTheBound => {
            shared.linger();
            closing(response)
        }
    }
}

fn too_large() -> Response {
    ApiError::TooLarge(BODY_LIMIT).into_response()
}

/// The body's length from `Content-Length`, if it says one.
fn announced_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `response`, telling the client that the connection ends with it (hyper closes it
/// once nothing reads the body any more).
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// How far [`Shared::drain`] read a body.
enum Drained {
    /// The connection can carry another request.
    ToItsEnd,
    /// The client cut it off, or sent something that is not HTTP.
    Failed,
    PastTheBound,
}

/// A request's body, shared between whatever reads it on the way to an answer and
/// [`read_to_end`], which reads the rest. The handler's copy may be dropped unread.
#[derive(Clone)]
struct Shared(Arc<Mutex<Reading>>);

struct Reading {
    body: Body,
    /// Bytes of the body read so far, by anyone.
    read: u64,
}

impl Shared {
    fn new(body: Body) -> Self {
        Self(Arc::new(Mutex::new(Reading { body, read: 0 })))
    }

    fn lock(&self) -> MutexGuard<'_, Reading> {
        self.0.lock().expect("body lock poisoned")
    }

    /// Reads what is left of the body and throws it away, until it ends or more than
    /// `bound` bytes of it were read in all.
    async fn drain(&self, bound: u64) -> Drained {
        let mut rest = self.clone();
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut rest).poll_frame(cx)).await {
                None => return Drained::ToItsEnd,
                Some(Err(_)) => return Drained::Failed,
                Some(Ok(_)) if self.lock().read > bound => return Drained::PastTheBound,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Goes on reading the body for [`LINGER`] (at most [`DRAIN_BOUND`] bytes more) while
    /// its answer leaves; the connection closes when this lets go of the body.
    fn linger(&self) {
        let rest = self.clone();
        tokio::spawn(async move {
            let bound = rest.lock().read.saturating_add(DRAIN_BOUND);
            let _ = tokio::time::timeout(LINGER, rest.drain(bound)).await;
        });
    }
}

impl hyper::body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut reading = self.lock();
        let polled = Pin::new(&mut reading.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            reading.read += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.lock().body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.lock().body.size_hint()
    }
}
