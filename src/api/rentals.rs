//! `/api/rent` and `/api/rentals/*`: renting, reading, renewing and releasing a rental,
//! and the `known_hosts` lines that let a client trust a rental's endpoint. The rules a
//! rent follows (its ttl, the tenant's quota, what an `Idempotency-Key` replays) are the
//! domain's ([`crate::rentals`]); these handlers parse, call it, and shape the answer.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, parse_json};
use super::idempotency;
use super::views::{ErrorBody, RenewBody, RentBody, RentalList, RentalView, RentedView};
use crate::auth::Caller;
use crate::context::Context;
use crate::model::{NotifyUrl, TenantKey, Username};
use crate::rentals::{self, RentRequest};
use crate::store::Constraints;

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::POST, "/api/rent", rent),
        endpoint(Method::GET, "/api/rentals", list_rentals),
        endpoint(Method::GET, "/api/rentals/{id}", get_rental),
        endpoint(Method::DELETE, "/api/rentals/{id}", release_rental),
        endpoint(Method::POST, "/api/rentals/{id}/renew", renew_rental),
        endpoint(Method::GET, "/api/ssh/known_hosts", known_hosts),
    ]
}

#[utoipa::path(post, path = "/api/rent", tag = "rentals",
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and body again answer the rental the first request made (201, `Idempotent-Replayed: true`, no password), never a second one; 1-255 visible ASCII characters, kept a day")),
    request_body(content = Option<RentBody>, description = "Every field optional; an empty body is `{}`"),
    responses(
        (status = 201, description = "Rented: connection details (and the password, once, when no key was given)", body = RentedView),
        (status = 409, description = "The username is taken, or a request with this Idempotency-Key is still running", body = ErrorBody),
        (status = 422, description = "A field is not acceptable, or the Idempotency-Key was used with another request", body = ErrorBody),
        (status = 429, description = "The tenant's quota is reached, or too many requests without a valid token from this address (see `Retry-After`)", body = ErrorBody),
        (status = 502, description = "Provisioning failed", body = ErrorBody),
        (status = 503, description = "No free worker", body = ErrorBody),
    ))]
pub(super) async fn rent(
    State(ctx): State<Context>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: RentBody = parse_json(&raw)?;
    let keyed = idempotency::key_of(&headers)?
        .map(|key| idempotency::Keyed::new(caller.tenant(), "rent", key, &raw));
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
    let constraints = placement(&ctx, &body).await?;
    let tenants = &ctx.config.tenants;
    let ttl = rentals::rent_ttl(body.ttl.as_ref(), &caller, tenants)?;
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(keyed) = &keyed {
        let in_handler = &ctx;
        let made = move |rental_id: String| async move {
            Ok(rentals::made_for_key(in_handler, &rental_id).await?)
        };
        let abandon = move |rental_id: String| async move {
            Ok(rentals::abandon_keyed_rent(in_handler, &rental_id).await?)
        };
        let deadline = rentals::cut_short_after(&ctx);
        if let idempotency::Begin::Replay(rental_id) =
            keyed.begin(&ctx, &id, deadline, made, abandon).await?
        {
            let detail = rentals::replay(&ctx, &rental_id, caller.tenant())
                .await?
                .ok_or_else(|| ApiError::NotFound("the key's rental is gone".into()))?;
            let body = RentedView {
                rental: RentalView::new(detail, &ctx.config.gateway.host),
                password: None,
            };
            return Ok((
                StatusCode::CREATED,
                [(idempotency::REPLAYED, "true")],
                Json(body),
            )
                .into_response());
        }
    }
    let request = RentRequest {
        key: keyed.as_ref().map(|k| k.hold(&ctx)),
        id: Some(id.clone()),
        tenant: caller.tenant().to_owned(),
        username,
        public_key,
        notify_url,
        token_id: match &caller {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t.token_id.clone()),
        },
        ttl,
        max_rentals: rentals::quota(&caller, tenants),
        constraints,
    };
    let rented = match keyed {
        None => rentals::rent(&ctx, request).await,
        // The key's record is written in the rent's own task: a client that goes away
        // mid-rent does not leave its key "running" for a retry to wait out.
        Some(keyed) => {
            let in_task = ctx.clone();
            rentals::rent_and_then(&ctx, request, move |made| async move {
                keyed.end(&in_task, &id, made.as_deref()).await;
            })
            .await
        }
    }?;
    let body = RentedView {
        rental: RentalView::new(rented.rental, &ctx.config.gateway.host),
        password: rented.password,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Where the rent may be placed ([`rentals::placement`]); the workers in service are
/// read only when the rent asks for a place.
async fn placement(ctx: &Context, body: &RentBody) -> Result<Constraints, ApiError> {
    let asked = body.site.is_some() || body.prefer_site.is_some() || body.labels.is_some();
    if !asked {
        return Ok(Constraints::default());
    }
    let (sites, labelled) = ctx.store.known_placement().await?;
    Ok(rentals::placement(
        body.site.as_deref(),
        body.prefer_site.as_deref(),
        body.labels.as_ref(),
        &sites,
        &labelled,
    )?)
}

#[utoipa::path(get, path = "/api/rentals/{id}", tag = "rentals",
    params(("id" = String, Path, description = "The rental's id")),
    responses(
        (status = 200, description = "The rental, with its placement history", body = RentalView),
        (status = 404, description = "No such rental (or another tenant's)", body = ErrorBody),
    ))]
pub(super) async fn get_rental(
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
    Ok(Json(RentalView::new(detail, &ctx.config.gateway.host)).into_response())
}

#[utoipa::path(get, path = "/api/rentals", tag = "rentals",
    responses(
        (status = 200, description = "Every rental not over that the caller may see", body = RentalList),
    ))]
pub(super) async fn list_rentals(
    State(ctx): State<Context>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let rentals = rentals_not_over(&ctx, &caller).await?;
    Ok(Json(RentalList { rentals }).into_response())
}

/// Every rental that is not over and that `caller` may see: by status, oldest first in each.
pub(super) async fn rentals_not_over(
    ctx: &Context,
    caller: &Caller,
) -> Result<Vec<RentalView>, ApiError> {
    Ok(ctx
        .store
        .live_rental_details()
        .await?
        .into_iter()
        .filter(|d| caller.scope().is_none_or(|t| t == d.rental.tenant))
        .map(|d| RentalView::new(d, &ctx.config.gateway.host))
        .collect())
}

#[utoipa::path(delete, path = "/api/rentals/{id}", tag = "rentals",
    params(("id" = String, Path, description = "The rental's id")),
    responses(
        (status = 204, description = "Released (or already released)"),
        (status = 404, description = "No such rental", body = ErrorBody),
        (status = 409, description = "Not releasable now", body = ErrorBody),
    ))]
pub(super) async fn release_rental(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    rentals::release(&ctx, &id, caller.scope()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/rentals/{id}/renew", tag = "rentals",
    params(("id" = String, Path, description = "The rental's id")),
    request_body(content = Option<RenewBody>, description = "Without `ttl`: the configured default"),
    responses(
        (status = 200, description = "Renewed", body = RentalView),
        (status = 404, description = "No such live rental", body = ErrorBody),
        (status = 422, description = "The ttl is not acceptable", body = ErrorBody),
    ))]
pub(super) async fn renew_rental(
    State(ctx): State<Context>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: RenewBody = parse_json(&body)?;
    let ttl = rentals::renew_ttl(body.ttl.as_ref(), &ctx.config.tenants)?;
    if ctx.store.renew(&id, caller.scope(), ttl).await?.is_none() {
        return Err(ApiError::NotFound("no such live rental".into()));
    }
    let detail = ctx
        .store
        .rental_detail(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such rental".into()))?;
    Ok(Json(RentalView::new(detail, &ctx.config.gateway.host)).into_response())
}

/// The `known_hosts` lines that make a plain OpenSSH client trust every worker through
/// Orion's host CA, on the gateway's names (any port): add them to `~/.ssh/known_hosts`
/// and log in through a rental's endpoint with `StrictHostKeyChecking=yes`, before and
/// after the rental moves. The certified keys of quarantined or retired workers follow
/// as `@revoked` lines. Any token may read them: they hold only public keys.
#[utoipa::path(get, path = "/api/ssh/known_hosts", tag = "rentals",
    responses(
        (status = 200, description = "One `@cert-authority` line", content_type = "text/plain", body = String),
        (status = 404, description = "Orion has no host CA (`ssh.host_ca_key` is not set)", body = ErrorBody),
    ))]
pub(super) async fn known_hosts(
    State(ctx): State<Context>,
    _caller: Caller,
) -> Result<Response, ApiError> {
    let Some(ca) = &ctx.host_ca else {
        return Err(ApiError::NotFound(
            "Orion has no SSH host certificate authority (ssh.host_ca_key is not set)".into(),
        ));
    };
    let revoked = ctx.store.revoked_host_keys().await?;
    let line = ca.known_hosts(&ctx.config.gateway.all_names(), &revoked);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        line,
    )
        .into_response())
}
