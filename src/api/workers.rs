//! `/api/workers` and its operator's actions: the fleet as the admin sees it, and
//! draining, undraining and restoring a worker. Adding, changing and retiring workers is
//! the inventory's ([`super::inventory`]).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, parse_json, require_admin};
use super::views::{ErrorBody, FleetWorkerView, WorkerList, WorkerView};
use crate::auth::Caller;
use crate::context::Context;

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::GET, "/api/workers", list_workers),
        endpoint(Method::POST, "/api/workers/{name}/drain", drain_worker),
        endpoint(Method::POST, "/api/workers/{name}/undrain", undrain_worker),
        endpoint(Method::POST, "/api/workers/{name}/restore", restore_worker),
    ]
}

#[utoipa::path(get, path = "/api/workers", tag = "workers",
    responses(
        (status = 200, description = "Every worker, with the rental holding it", body = WorkerList),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
pub(super) async fn list_workers(
    State(ctx): State<Context>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    Ok(Json(WorkerList {
        workers: fleet(&ctx).await?,
    })
    .into_response())
}

/// Every worker as `GET /api/workers` shows it: the stored fields, `allocated`, and
/// `rental` (`{id, tenant, username, serving}` of the rental holding it, or null).
pub(super) async fn fleet(ctx: &Context) -> Result<Vec<FleetWorkerView>, ApiError> {
    let workers = ctx.store.list_workers_with_occupants().await?;
    Ok(workers
        .into_iter()
        .map(|(w, rental)| FleetWorkerView {
            worker: WorkerView::from(w),
            rental,
        })
        .collect())
}

#[utoipa::path(post, path = "/api/workers/{name}/drain", tag = "workers",
    params(("name" = String, Path, description = "The worker's name")),
    responses(
        (status = 200, description = "Drained: no new rentals; its tenants move away", body = WorkerView),
        (status = 404, description = "No such worker", body = ErrorBody),
    ))]
pub(super) async fn drain_worker(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(ctx, caller, name, true).await
}

#[utoipa::path(post, path = "/api/workers/{name}/undrain", tag = "workers",
    params(("name" = String, Path, description = "The worker's name")),
    responses(
        (status = 200, description = "Back in service", body = WorkerView),
        (status = 404, description = "No such worker", body = ErrorBody),
    ))]
pub(super) async fn undrain_worker(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_drained(ctx, caller, name, false).await
}

/// `POST /api/workers/{name}/restore`: what the operator says when a quarantined worker
/// may serve again.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RestoreBody {
    /// Forget the host key trusted on first use: the next probe trusts the key the worker
    /// presents then (the worker was rebuilt, its key changed on purpose).
    #[serde(default)]
    forget_host_key: bool,
}

#[utoipa::path(post, path = "/api/workers/{name}/restore", tag = "workers",
    params(("name" = String, Path, description = "The worker's name")),
    request_body(content = Option<RestoreBody>, description = "Optional; `{}` by default"),
    responses(
        (status = 200, description = "Back in service (or it was not quarantined: nothing changed)", body = WorkerView),
        (status = 404, description = "No such worker", body = ErrorBody),
    ))]
pub(super) async fn restore_worker(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: RestoreBody = parse_json(&body)?;
    if ctx
        .store
        .restore_worker(&name, body.forget_host_key)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("no such worker".into()));
    }
    // Probed at once: its status is told by a probe, not assumed.
    ctx.wake.health.notify_one();
    ctx.wake.apps.notify_one();
    let worker = ctx
        .store
        .worker_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such worker".into()))?;
    Ok(Json(WorkerView::from(worker)).into_response())
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
    Ok(Json(WorkerView::from(worker)).into_response())
}
