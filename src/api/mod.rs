//! The HTTP API (axum, JSON).
//!
//! | route | what it does |
//! |---|---|
//! | `POST /api/rent` | rent a worker: 201 with connection details, 503 if none is free |
//! | `GET /api/rentals` | every rental that is not over |
//! | `GET /api/rentals/{id}` | one rental: status, current placement, history |
//! | `DELETE /api/rentals/{id}` | release: remove the account, free the worker, 204 |
//! | `GET /api/workers` | admin: every worker with status, last probe, the rental holding it |
//! | `POST /api/workers/{name}/drain` | admin: no new rentals there; its tenants move away |
//! | `POST /api/workers/{name}/undrain` | admin: back in service |
//! | `POST /api/tokens` | admin: make a tenant token (shown once) |
//! | `GET /api/tokens` | admin: list tokens (never the tokens themselves) |
//! | `DELETE /api/tokens/{id}` | admin: revoke a token |
//! | `GET /api/events?after=&limit=` | admin: the events log, oldest first, paged by id |
//! | `GET /api/events/stream` | admin: the same records live, as Server-Sent Events |
//! | `GET /metrics` | admin: Prometheus metrics |
//! | `GET /dashboard` | admin: the live dashboard (HTML): workers, rentals, latest events |
//! | `GET /dashboard/app.js`, `/dashboard/app.css` | the dashboard's script and style (open) |
//! | `GET /api/status` | admin: database reachability, fleet counts, loop status, rate limited |
//! | `GET /health` | open: up, and whether the database answers (503 if not); nothing else |
//!
//! Every `/api/*` route needs `Authorization: Bearer <token>`: the admin token from the
//! configuration, or a tenant token. To read (GET), the token is also accepted as the
//! password of `Authorization: Basic` (any user name), which is what a browser sends:
//! `/dashboard` answers 401 with `WWW-Authenticate: Basic` so that the browser asks for
//! it, and then sends it with the page's own requests to the API. A tenant sees only its
//! own rentals (another's answers 404) and no admin route (403). `/health` is open.
//! Every request first goes through [`guard`]: bodies of state-changing requests must be
//! JSON (415), Basic credentials cannot change anything (401: a page on another site
//! could make a logged-in browser send them), and requests without a valid token are
//! rate limited per client address (429).

mod dashboard;
mod error;
mod guard;
mod status;
pub mod views;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use guard::client_address;

use crate::auth::{self, Caller};

use crate::context::Context;
use crate::model::{NotifyUrl, TenantKey, TtlInput, Username};
use crate::rentals::{self, RentRequest};
use views::RentalView;

/// Largest request body accepted; a rent request is a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(ApiError::Forbidden("this needs the admin token".into())),
    }
}

/// The router, with its state; tests call this directly.
pub fn app(ctx: Context) -> Router {
    // Bounds a request end to end; a rent waits for provisioning, so it is the SSH
    // connect and command timeouts plus slack.
    let request_timeout = ctx.config.rent_deadline();
    Router::new()
        .route("/api/rent", post(rent))
        .route("/api/rentals", get(list_rentals))
        .route("/api/rentals/{id}", get(get_rental).delete(release_rental))
        .route("/api/rentals/{id}/renew", post(renew_rental))
        .route("/api/workers", get(list_workers))
        .route("/api/workers/{name}/drain", post(drain_worker))
        .route("/api/workers/{name}/undrain", post(undrain_worker))
        .route("/api/events", get(list_events))
        .route("/api/events/stream", get(stream_events))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/status", get(status::status))
        .route("/health", get(status::health))
        .route("/metrics", get(prometheus_metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::style))
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
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(ctx)
}

/// Body of `POST /api/rent`. Every field is optional; unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RentBody {
    /// One OpenSSH public key line; without it a password is generated.
    ssh_public_key: Option<String>,
    /// Login name wanted on the worker; generated if absent.
    username: Option<String>,
    /// Where to POST the new connection details when the rental moves.
    notify_url: Option<String>,
    /// How long the rental lives unless renewed: seconds, or e.g. `"2h"`.
    ttl: Option<TtlInput>,
}

async fn rent(
    State(ctx): State<Context>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: RentBody = parse_json(&body)?;
    // Validate everything before anything is written or run.
    let username = body.username.as_deref().map(Username::parse).transpose()?;
    let public_key = body
        .ssh_public_key
        .as_deref()
        .map(TenantKey::parse)
        .transpose()?;
    let notify_url = body
        .notify_url
        .as_deref()
        .map(NotifyUrl::parse)
        .transpose()?;
    if let Some(url) = &notify_url {
        ctx.notifier.check(url).await?;
    }
    let tenants = &ctx.config.tenants;
    let ttl = match (&body.ttl, &caller) {
        (Some(ttl), _) => Some(ttl.parse(tenants.max_ttl)?),
        (None, Caller::Tenant(_)) => tenants.default_ttl,
        (None, Caller::Admin) => None,
    };
    let (token_id, max_rentals) = match &caller {
        Caller::Admin => (None, None),
        Caller::Tenant(t) => (
            Some(t.token_id.clone()),
            Some(t.max_rentals.unwrap_or(tenants.max_rentals)),
        ),
    };
    let rented = rentals::rent(
        &ctx,
        RentRequest {
            tenant: caller.tenant().to_owned(),
            username,
            public_key,
            notify_url,
            token_id,
            ttl,
            max_rentals,
        },
    )
    .await?;
    let view = RentalView::from(rented.rental);
    let mut body = serde_json::to_value(&view).map_err(|e| ApiError::Unexpected(e.into()))?;
    if let Some(password) = rented.password {
        body["password"] = json!(password);
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Parses a JSON body; an empty body is an empty object (all fields optional).
fn parse_json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn get_rental(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Another tenant's rental is answered exactly like a missing one.
    let detail = ctx
        .store
        .rental_detail(&id)
        .await?
        .filter(|d| caller.scope().is_none_or(|t| t == d.rental.tenant))
        .ok_or_else(|| ApiError::NotFound("no such rental".into()))?;
    Ok(Json(RentalView::from(detail)).into_response())
}

async fn list_rentals(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    let views = rentals_not_over(&ctx, &caller).await?;
    Ok(Json(json!({ "rentals": views })).into_response())
}

/// Every rental that is not over and that `caller` may see: by status, oldest first in each.
async fn rentals_not_over(ctx: &Context, caller: &Caller) -> Result<Vec<RentalView>, ApiError> {
    Ok(ctx
        .store
        .live_rental_details()
        .await?
        .into_iter()
        .filter(|d| caller.scope().is_none_or(|t| t == d.rental.tenant))
        .map(RentalView::from)
        .collect())
}

async fn release_rental(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    rentals::release(&ctx, &id, caller.scope()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /api/rentals/{id}/renew`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    /// The rental's new time to live, from now: seconds, or e.g. `"2h"`.
    ttl: Option<TtlInput>,
}

async fn renew_rental(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: RenewBody = parse_json(&body)?;
    let tenants = &ctx.config.tenants;
    let ttl = match &body.ttl {
        Some(ttl) => ttl.parse(tenants.max_ttl)?,
        None => tenants.default_ttl.ok_or_else(|| {
            crate::model::InvalidInput::new("ttl", "is required (no default ttl is configured)")
        })?,
    };
    if ctx.store.renew(&id, caller.scope(), ttl).await?.is_none() {
        return Err(ApiError::NotFound("no such live rental".into()));
    }
    let detail = ctx
        .store
        .rental_detail(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such rental".into()))?;
    Ok(Json(RentalView::from(detail)).into_response())
}

async fn list_workers(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    Ok(Json(json!({ "workers": workers_json(&ctx).await? })).into_response())
}

/// Every worker as `GET /api/workers` shows it: the stored fields, `allocated`, and
/// `rental` (`{id, tenant, username, serving}` of the rental holding it, or null).
async fn workers_json(ctx: &Context) -> Result<Vec<serde_json::Value>, ApiError> {
    let workers = ctx.store.list_workers_with_occupants().await?;
    Ok(workers
        .iter()
        .map(|(w, occupant)| {
            let mut v = serde_json::to_value(w).expect("a worker serialises");
            v["allocated"] = json!(w.allocated());
            v["rental"] = json!(occupant);
            v
        })
        .collect())
}

async fn drain_worker(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(ctx, caller, name, true).await
}

async fn undrain_worker(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(ctx, caller, name, false).await
}

async fn set_drained(
    ctx: Context,
    caller: Caller,
    name: String,
    drained: bool,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    if !ctx.store.set_drained(&name, drained).await? {
        return Err(ApiError::NotFound("no such worker".into()));
    }
    if drained {
        // Move its tenants now rather than at the next tick.
        ctx.wake.migration.notify_one();
    }
    let worker = ctx
        .store
        .worker_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such worker".into()))?;
    let mut body = serde_json::to_value(&worker).map_err(|e| ApiError::Unexpected(e.into()))?;
    body["allocated"] = json!(worker.allocated());
    Ok(Json(body).into_response())
}

/// Body of `POST /api/tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    tenant: Option<String>,
    /// This token's limit on the tenant's live rentals (default: `tenants.max_rentals`).
    max_rentals: Option<u32>,
}

async fn create_token(
    State(ctx): State<Context>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: TokenBody = parse_json(&body)?;
    let tenant = body
        .tenant
        .as_deref()
        .ok_or_else(|| crate::model::InvalidInput::new("tenant", "is required"))
        .and_then(crate::model::parse_tenant)?;
    let max_rentals = body.max_rentals;
    if max_rentals.is_some_and(|n| !(1..=10_000).contains(&n)) {
        return Err(
            crate::model::InvalidInput::new("max_rentals", "must be between 1 and 10000").into(),
        );
    }
    let token = auth::generate_token();
    let record = ctx
        .store
        .create_token(&tenant, &auth::token_hash(&token), max_rentals)
        .await?;
    let mut body = serde_json::to_value(&record).map_err(|e| ApiError::Unexpected(e.into()))?;
    body["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_tokens(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    Ok(Json(json!({ "tokens": ctx.store.list_tokens().await? })).into_response())
}

/// Query of `DELETE /api/tokens/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeQuery {
    /// Also release every live rental made with the token.
    #[serde(default)]
    release_rentals: bool,
}

async fn revoke_token(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<RevokeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    require_admin(&caller)?;
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    if !ctx.store.revoke_token(&id).await? {
        return Err(ApiError::NotFound("no such live token".into()));
    }
    if query.release_rentals {
        // Their time is up now: released here, or by the cleanup loop for one that is
        // mid-move and cannot be released this instant.
        let ended = ctx.store.expire_rentals_of_token(&id).await?;
        tracing::info!(token_id = %id, rentals = ended, "token revoked with its rentals");
        rentals::release_expired(&ctx).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only events with a larger id (0: from the start).
    #[serde(default)]
    after: u64,
    /// At most this many (1..=1000, default 100).
    limit: Option<u32>,
    /// Instead of paging from `after`: the latest this many (1..=1000).
    last: Option<u32>,
}

async fn list_events(
    State(ctx): State<Context>,
    caller: Caller,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(crate::model::InvalidInput::new("limit", "must be between 1 and 1000").into());
    }
    let events = match query.last {
        Some(n) if (1..=1000).contains(&n) => ctx.store.latest_events(n).await?,
        Some(_) => {
            return Err(
                crate::model::InvalidInput::new("last", "must be between 1 and 1000").into(),
            );
        }
        None => ctx.store.events_after(query.after, limit).await?,
    };
    let next = events.last().map_or(query.after, |e| e.id);
    Ok(Json(json!({ "events": events, "next": next })).into_response())
}

/// How often the event stream looks for new events. Polling the table (rather than an
/// in-process channel) shows the events of every Orion process sharing the database.
const STREAM_POLL: Duration = Duration::from_millis(250);

async fn stream_events(
    State(ctx): State<Context>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    require_admin(&caller)?;
    // A reconnecting client says where it stopped; a new one starts from now.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = match resume {
        Some(id) => id,
        None => ctx.store.last_event_id().await?,
    };
    let stopping = ctx.stopping.clone().cancelled_owned();
    let stream = futures::stream::unfold((ctx, start), |(ctx, after)| async move {
        loop {
            match ctx.store.events_after(after, 100).await {
                Ok(events) if !events.is_empty() => {
                    let next = events.last().map_or(after, |e| e.id);
                    let items: Vec<Result<SseEvent, std::convert::Infallible>> = events
                        .into_iter()
                        .map(|e| {
                            Ok(SseEvent::default()
                                .id(e.id.to_string())
                                .event(e.kind.clone())
                                .json_data(&e)
                                .expect("an event serialises"))
                        })
                        .collect();
                    return Some((futures::stream::iter(items), (ctx, next)));
                }
                // Nothing new, or the database is away: look again shortly.
                _ => tokio::time::sleep(STREAM_POLL).await,
            }
        }
    });
    use futures::StreamExt;
    Ok(Sse::new(stream.flatten().take_until(stopping))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Prometheus text format. The fleet and rental gauges are read from the database now,
/// so they are right whichever Orion process made the changes.
async fn prometheus_metrics(
    State(ctx): State<Context>,
    caller: Caller,
) -> Result<Response, ApiError> {
    use crate::metrics::names;
    require_admin(&caller)?;
    let handle = crate::metrics::handle();
    let w = ctx.store.worker_counts().await?;
    for (status, n) in [
        ("alive", w.alive),
        ("dead", w.dead),
        ("unknown", w.unknown),
        ("quarantined", w.quarantined),
        ("free", w.free),
        ("allocated", w.allocated),
    ] {
        metrics::gauge!(names::WORKERS, "status" => status).set(n as f64);
    }
    for (status, n) in ctx.store.rental_counts().await? {
        metrics::gauge!(names::RENTALS, "status" => status).set(n as f64);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this route".into())
}
