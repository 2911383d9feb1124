//! `GET /health` (open) and `GET /api/status` (admin).
//!
//! `/health` says that Orion is up and whether its database answers, nothing else: it
//! is open, so it must cost nearly nothing and tell an outsider nothing about the fleet.
//! It keeps the database in it, rather than leaving that to a separate `/ready`,
//! because every reader of it means "ready to serve": Caddy's active health check,
//! `orion healthcheck` (the container's health), `scripts/platform.sh` waiting for the
//! platform; a rent needs the database. The database is asked at most once per second
//! ([`Readiness`]), however many requests come, so an open route is no way to load it.
//!
//! `/api/status` shows the operator what `/health` used to: fleet counts and each
//! control loop's last success and last error, plus how many requests the rate limit
//! refused.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, require_admin};
use super::views::{ErrorDetail, HealthView, StatusView};
use crate::auth::Caller;
use crate::context::Context;
use crate::store::Store;

pub(super) fn endpoints() -> Vec<Endpoint> {
    use axum::http::Method;
    vec![
        endpoint(Method::GET, "/api/status", status),
        endpoint(Method::GET, "/health", health),
    ]
}

/// How long an answer of the database is reused.
const FRESH: Duration = Duration::from_secs(1);

/// Bound on one check, under Caddy's `health_timeout` (3 s) so that a hung database
/// reads as down rather than as a hung Orion.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the database answered, asked at most once per [`FRESH`] and by one request
/// at a time; the others meanwhile get the last answer.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    last: Mutex<Option<(Instant, bool)>>,
    checking: tokio::sync::Mutex<()>,
}

impl Readiness {
    async fn database_up(&self, store: &Store) -> bool {
        let last = *self.last.lock().expect("readiness poisoned");
        if let Some((at, up)) = last
            && at.elapsed() < FRESH
        {
            return up;
        }
        let _checking = match (self.checking.try_lock(), last) {
            (Ok(turn), _) => turn,
            // Someone is asking the database now: their answer or the last one will do.
            (Err(_), Some((_, up))) => return up,
            // The very first check: wait for it.
            (Err(_), None) => self.checking.lock().await,
        };
        // Answered while this request waited for its turn?
        if let Some((at, up)) = *self.last.lock().expect("readiness poisoned")
            && at.elapsed() < FRESH
        {
            return up;
        }
        let up = tokio::time::timeout(PING_TIMEOUT, store.ping())
            .await
            .unwrap_or(false);
        *self.last.lock().expect("readiness poisoned") = Some((Instant::now(), up));
        up
    }
}

/// `GET /health`: 200 `{"status": "ok", "database": "up", "version"}`, or 503 with
/// `"database": "down"` and the JSON error.
#[utoipa::path(get, path = "/health", tag = "service", security(()),
    responses(
        (status = 200, description = "Up, and the database answers", body = HealthView),
        (status = 503, description = "The database does not answer", body = HealthView),
    ))]
pub(super) async fn health(
    State(ctx): State<Context>,
    Extension(readiness): Extension<std::sync::Arc<Readiness>>,
) -> Response {
    let version = env!("CARGO_PKG_VERSION");
    if readiness.database_up(&ctx.store).await {
        Json(HealthView {
            status: "ok",
            database: "up",
            version,
            instance: ctx.leader.instance().to_owned(),
            leader: ctx.leader.is_leading(),
            epoch: ctx.leader.epoch(),
            error: None,
        })
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthView {
                status: "degraded",
                database: "down",
                version,
                instance: ctx.leader.instance().to_owned(),
                leader: ctx.leader.is_leading(),
                epoch: ctx.leader.epoch(),
                error: Some(database_unreachable()),
            }),
        )
            .into_response()
    }
}

/// `GET /api/status` (admin): database, fleet counts, loops, requests rate limited;
/// 503 (loops still shown) when the database is down.
#[utoipa::path(get, path = "/api/status", tag = "service",
    responses(
        (status = 200, description = "Database, fleet counts, loops", body = StatusView),
        (status = 403, description = "A tenant token", body = super::views::ErrorBody),
        (status = 503, description = "The database does not answer (loops still shown)", body = StatusView),
    ))]
pub(super) async fn status(
    State(ctx): State<Context>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let loops = ctx.loops.snapshot();
    let rate_limited = ctx.limiter.refused();
    Ok(match ctx.store.worker_counts().await {
        Ok(counts) => Json(StatusView {
            status: "ok",
            database: "up",
            workers: Some(counts),
            instance: ctx.leader.instance().to_owned(),
            leader: ctx.leader.is_leading(),
            loops,
            rate_limited,
            error: None,
        })
        .into_response(),
        Err(e) => {
            tracing::debug!(error = %e, "status: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(StatusView {
                    status: "degraded",
                    database: "down",
                    workers: None,
                    instance: ctx.leader.instance().to_owned(),
                    leader: ctx.leader.is_leading(),
                    loops,
                    rate_limited,
                    error: Some(database_unreachable()),
                }),
            )
                .into_response()
        }
    })
}

fn database_unreachable() -> ErrorDetail {
    ErrorDetail {
        code: "unavailable".to_owned(),
        message: "the database is unreachable".into(),
        field: None,
    }
}
