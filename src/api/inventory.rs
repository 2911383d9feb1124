//! The inventory routes (admin): the workers Orion may rent out, changed live. A whole
//! inventory (`PUT /api/inventory`, what `orion inventory apply` sends; with `dry_run`
//! it only shows the difference) or one worker at a time (`POST`, `PATCH`, `DELETE
//! /api/workers/{name}`); `GET /api/inventory` is the inventory as a file. All go
//! through [`crate::inventory::edit`]: validated whole, written in one transaction.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, parse_json, require_admin};
use super::views::{ErrorBody, WorkerView};
use crate::auth::Caller;
use crate::context::Context;
use crate::inventory::{Edit, Inventory, WorkerFields};
use crate::model::InvalidInput;

pub(super) fn endpoints() -> Vec<Endpoint> {
    use axum::http::Method;
    vec![
        endpoint(Method::POST, "/api/workers/{name}", add),
        endpoint(Method::PATCH, "/api/workers/{name}", change),
        endpoint(Method::DELETE, "/api/workers/{name}", retire),
        endpoint(Method::GET, "/api/inventory", export),
        endpoint(Method::PUT, "/api/inventory", apply),
    ]
}

/// Body of `PUT /api/inventory`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryBody {
    /// Required: the whole inventory, as the TOML file (`inventory/compose.toml` shows
    /// the format). Workers it leaves out are retired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory: Option<String>,
    /// Show what would change, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What an edit of the inventory changed (or would change, with `dry_run`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InventoryChanges {
    /// Whether the changes were made (`false`: a dry run).
    pub applied: bool,
    /// One line a worker: `+ name: added …`, `~ name: site a -> b`, `- name: retired`.
    pub changes: Vec<String>,
}

#[utoipa::path(get, path = "/api/inventory", operation_id = "export_inventory", tag = "workers",
    responses(
        (status = 200, description = "The inventory Orion holds, as a TOML file", content_type = "application/toml", body = String),
    ))]
pub async fn export(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let inventory = ctx.store.inventory().await?;
    Ok((
        [(header::CONTENT_TYPE, "application/toml; charset=utf-8")],
        inventory.to_toml(),
    )
        .into_response())
}

#[utoipa::path(put, path = "/api/inventory", operation_id = "apply_inventory", tag = "workers",
    request_body = InventoryBody,
    responses(
        (status = 200, description = "The difference, applied unless `dry_run`", body = InventoryChanges),
        (status = 422, description = "The inventory is invalid (file line and field named); nothing changed", body = ErrorBody),
    ))]
pub async fn apply(
    State(ctx): State<Context>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let raw = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: InventoryBody = parse_json(&raw)?;
    let text = body
        .inventory
        .ok_or_else(|| InvalidInput::new("inventory", "required: the inventory file's text"))?;
    let wanted = Inventory::parse(&text, std::path::Path::new("inventory"))
        .map_err(|e| InvalidInput::new("inventory", e.to_string()))?;
    let changes =
        crate::inventory::edit(&ctx, |held| held.replaced_by(wanted), body.dry_run).await?;
    Ok(Json(InventoryChanges {
        applied: !body.dry_run,
        changes: changes.iter().map(ToString::to_string).collect(),
    })
    .into_response())
}

#[utoipa::path(post, path = "/api/workers/{name}", operation_id = "add_worker", tag = "workers",
    params(("name" = String, Path, description = "The new worker's name")),
    request_body = WorkerFields,
    responses(
        (status = 201, description = "Added: probed at once, rented out once alive", body = WorkerView),
        (status = 409, description = "A worker of that name is in the inventory", body = ErrorBody),
        (status = 422, description = "A field is invalid (named); nothing changed", body = ErrorBody),
    ))]
pub async fn add(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    edit_one(ctx, caller, name, body, Edit::Add).await
}

#[utoipa::path(patch, path = "/api/workers/{name}", operation_id = "change_worker", tag = "workers",
    params(("name" = String, Path, description = "The worker's name")),
    request_body = WorkerFields,
    responses(
        (status = 200, description = "Changed", body = WorkerView),
        (status = 404, description = "No such worker in the inventory", body = ErrorBody),
        (status = 422, description = "A field is invalid (named); nothing changed", body = ErrorBody),
    ))]
pub async fn change(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    edit_one(ctx, caller, name, body, Edit::Change).await
}

async fn edit_one(
    ctx: Context,
    caller: Caller,
    name: String,
    body: Result<Bytes, BytesRejection>,
    edit: Edit,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let raw = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let fields: WorkerFields = parse_json(&raw)?;
    crate::inventory::edit(&ctx, |held| held.with_worker(&name, &fields, edit), false).await?;
    let status = match edit {
        Edit::Add => StatusCode::CREATED,
        Edit::Change => StatusCode::OK,
    };
    Ok((status, Json(worker_view(&ctx, &name).await?)).into_response())
}

#[utoipa::path(delete, path = "/api/workers/{name}", operation_id = "retire_worker", tag = "workers",
    params(("name" = String, Path, description = "The worker's name")),
    responses(
        (status = 200, description = "Retired: never rented out again; a rental on it moves to another worker first (`allocated` until its account there is removed)", body = WorkerView),
        (status = 404, description = "No such worker in the inventory", body = ErrorBody),
    ))]
pub async fn retire(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    crate::inventory::edit(&ctx, |held| held.without(&name), false).await?;
    Ok(Json(worker_view(&ctx, &name).await?).into_response())
}

async fn worker_view(ctx: &Context, name: &str) -> Result<WorkerView, ApiError> {
    let worker = ctx
        .store
        .worker_by_name(name)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such worker".into()))?;
    Ok(WorkerView::from(worker))
}
