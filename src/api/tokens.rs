//! `/api/tokens`: the admin makes, lists and revokes tenants' tokens. A token is shown
//! once, when made; only its hash is kept.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, parse_json, require_admin};
use super::views::{CreatedToken, ErrorBody, TokenBody, TokenList};
use crate::auth::{self, Caller};
use crate::context::Context;
use crate::model::InvalidInput;
use crate::rentals;

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::GET, "/api/tokens", list_tokens),
        endpoint(Method::POST, "/api/tokens", create_token),
        endpoint(Method::DELETE, "/api/tokens/{id}", revoke_token),
    ]
}

#[utoipa::path(post, path = "/api/tokens", tag = "tokens",
    request_body = TokenBody,
    responses(
        (status = 201, description = "The token (shown once) and its record", body = CreatedToken),
        (status = 409, description = "The name differs from an existing tenant's only in case", body = ErrorBody),
        (status = 422, description = "A field is not acceptable", body = ErrorBody),
    ))]
pub(super) async fn create_token(
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
        .ok_or_else(|| InvalidInput::new("tenant", "is required"))
        .and_then(crate::model::parse_tenant)?;
    let max_rentals = body.max_rentals;
    if max_rentals.is_some_and(|n| !(1..=10_000).contains(&n)) {
        return Err(InvalidInput::new("max_rentals", "must be between 1 and 10000").into());
    }
    let token = auth::generate_token();
    let record = ctx
        .store
        .create_token(&tenant, &auth::token_hash(&token), max_rentals)
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })).into_response())
}

#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token's record (never the token)", body = TokenList),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
pub(super) async fn list_tokens(
    State(ctx): State<Context>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let tokens = ctx.store.list_tokens().await?;
    Ok(Json(TokenList { tokens }).into_response())
}

/// Query of `DELETE /api/tokens/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct RevokeQuery {
    /// Also release every live rental made with the token.
    #[serde(default)]
    release_rentals: bool,
}

#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id"), RevokeQuery),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such live token", body = ErrorBody),
    ))]
pub(super) async fn revoke_token(
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
