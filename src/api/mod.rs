//! The HTTP API (axum, JSON): one file per resource, each with its handlers and the
//! list of its routes; this module merges them into one router ([`app`]) and holds what
//! they share (the error mapping, the guard, the body limit).
//!
//! The routes, their parameters, bodies and answers are described by the OpenAPI
//! document ([`ApiDoc`], served open at `GET /api/openapi.json`), which tests hold to
//! the router: read it there rather than in a list here.
//!
//! Every `/api/*` route needs `Authorization: Bearer <token>`: the admin token from the
//! configuration, or a tenant token. To read (GET), the token is also accepted as the
//! password of `Authorization: Basic` (any user name), which is what a browser sends:
//! `/dashboard` answers 401 with `WWW-Authenticate: Basic` so that the browser asks for
//! it, and then sends it with the page's own requests to the API. A tenant sees only its
//! own rentals (another's answers 404) and no admin route (403). `/health` and `/api/openapi.json` are open.
//! Every request first goes through [`guard`]: bodies of state-changing requests must be
//! JSON (415), Basic credentials cannot change anything (401: a page on another site
//! could make a logged-in browser send them), and requests without a valid token are
//! rate limited per client address (429).

pub mod apps;
mod body;
mod dashboard;
mod error;
mod events;
pub(crate) mod guard;
mod handler;
mod idempotency;
pub mod inventory;
mod openapi;
mod prometheus;
mod rentals;
mod status;
mod tokens;
pub mod views;
mod workers;

/// How long an `Idempotency-Key` is kept.
pub const IDEMPOTENCY_KEPT: std::time::Duration = idempotency::KEPT;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::http::StatusCode;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use guard::client_address;
pub use openapi::ApiDoc;

use handler::Endpoint;

use crate::context::Context;

/// Largest request body accepted; a rent request is a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;

/// Every route, the one list the router is built from and the OpenAPI test checks
/// ([`ApiDoc`] must describe each): each resource's own list.
fn endpoints() -> Vec<Endpoint> {
    [
        rentals::endpoints(),
        apps::endpoints(),
        workers::endpoints(),
        inventory::endpoints(),
        events::endpoints(),
        tokens::endpoints(),
        status::endpoints(),
        openapi::endpoints(),
        prometheus::endpoints(),
        dashboard::endpoints(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The `(method, path)` of every route the router answers.
pub fn routes() -> Vec<(Method, &'static str)> {
    endpoints()
        .into_iter()
        .map(|e| (e.method, e.path))
        .collect()
}

/// The router, with its state; tests call this directly.
pub fn app(ctx: Context) -> Router {
    // Bounds a request end to end; a rent waits for provisioning, so it is the SSH
    // connect and command timeouts plus slack.
    let request_timeout = ctx.config.rent_deadline();
    // Two endpoints on one path are merged into one method router.
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, e| router.route(e.path, e.handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            guard::guard,
        ))
        .layer(axum::Extension(std::sync::Arc::new(
            status::Readiness::default(),
        )))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(body::read_to_end))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(ctx)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this route".into())
}
