//! The HTTP API (axum, JSON).
//!
//! | route | what it does |
//! |---|---|
//! | `POST /api/rent` | rent a worker: 201 with connection details, 503 if none is free |
//! | `GET /api/rentals` | every rental that is not over |
//! | `GET /api/rentals/{id}` | one rental: status, current placement, history |
//! | `DELETE /api/rentals/{id}` | release: remove the account, free the worker, 204 |
//! | `GET /api/workers` | every worker with status, allocation, last probe |
//! | `GET /health` | database reachability, fleet counts, loop status; 503 if the DB is down |

mod error;

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

use crate::context::Context;
use crate::model::{NotifyUrl, RentalStatus, TenantKey, Username};
use crate::rentals::{self, RentRequest};

/// Largest request body accepted; a rent request is a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;

/// Tenant of rentals made without authentication.
pub const DEFAULT_TENANT: &str = "default";

/// The router, with its state; tests call this directly.
pub fn app(ctx: Context) -> Router {
    // Bounds a request end to end; a rent waits for provisioning, so it is the SSH
    // connect and command timeouts plus slack.
    let request_timeout = ctx.config.ssh.connect_timeout * 2
        + ctx.config.ssh.command_timeout * 2
        + Duration::from_secs(5);
    Router::new()
        .route("/api/rent", post(rent))
        .route("/api/rentals", get(list_rentals))
        .route("/api/rentals/{id}", get(get_rental).delete(release_rental))
        .route("/api/workers", get(list_workers))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
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
}

async fn rent(
    State(ctx): State<Context>,
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
    let rented = rentals::rent(
        &ctx,
        RentRequest {
            tenant: DEFAULT_TENANT.to_owned(),
            username,
            public_key,
            notify_url,
        },
    )
    .await?;
    let mut body =
        serde_json::to_value(&rented.rental).map_err(|e| ApiError::Unexpected(e.into()))?;
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
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = ctx
        .store
        .rental_view(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such rental".into()))?;
    Ok(Json(view).into_response())
}

async fn list_rentals(State(ctx): State<Context>) -> Result<Response, ApiError> {
    let mut views = Vec::new();
    for status in [
        RentalStatus::Provisioning,
        RentalStatus::Active,
        RentalStatus::Migrating,
        RentalStatus::Waiting,
        RentalStatus::Releasing,
    ] {
        for r in ctx.store.rentals_in(status).await? {
            if let Some(view) = ctx.store.rental_view(&r.id).await? {
                views.push(view);
            }
        }
    }
    Ok(Json(json!({ "rentals": views })).into_response())
}

async fn release_rental(
    State(ctx): State<Context>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    rentals::release(&ctx, &id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_workers(State(ctx): State<Context>) -> Result<Response, ApiError> {
    let workers = ctx.store.list_workers().await?;
    let list: Vec<_> = workers
        .iter()
        .map(|w| {
            let mut v = serde_json::to_value(w).expect("a worker serialises");
            v["allocated"] = json!(w.allocated());
            v
        })
        .collect();
    Ok(Json(json!({ "workers": list })).into_response())
}

async fn health(State(ctx): State<Context>) -> Response {
    let loops = ctx.loops.snapshot();
    match ctx.store.worker_counts().await {
        Ok(counts) => Json(json!({
            "status": "ok",
            "database": "up",
            "workers": counts,
            "loops": loops,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "degraded",
                    "database": "down",
                    "loops": loops,
                    "error": { "code": "unavailable", "message": "the database is unreachable" },
                })),
            )
                .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this route".into())
}
