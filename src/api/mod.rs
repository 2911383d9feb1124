//! The HTTP API (axum, JSON).
//!
//! | route | what it does |
//! |---|---|
//! | `POST /api/rent` | rent a worker: 201 with connection details, 503 if none is free |
//! | `GET /api/rentals` | every rental that is not over |
//! | `GET /api/rentals/{id}` | one rental: status, current placement, history |
//! | `DELETE /api/rentals/{id}` | release: remove the account, free the worker, 204 |
//! | `POST /api/apps` | create an app: an image run as `replicas` instances on distinct workers |
//! | `GET /api/apps`, `GET /api/apps/{name}` | apps and their instances (where, status, restarts) |
//! | `PATCH /api/apps/{name}` | scale (`replicas`), or roll to a new `image` one instance at a time |
//! | `DELETE /api/apps/{name}` | delete: every instance removed from its worker, 204 |
//! | `GET /api/apps/{name}/logs?instance=&lines=` | the tail of an instance's log (text) |
//! | `GET /api/workers` | admin: every worker with status, last probe, the rental holding it |
//! | `POST /api/workers/{name}/drain` | admin: no new rentals there; its tenants move away |
//! | `POST /api/workers/{name}/undrain` | admin: back in service |
//! | `POST /api/workers/{name}/restore` | admin: a quarantined worker back in service |
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
//! | `GET /api/openapi.json` | open: the OpenAPI 3 document of these routes ([`ApiDoc`]) |
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
pub(crate) mod guard;
mod idempotency;
pub mod inventory;

/// How long an `Idempotency-Key` is kept.
pub const IDEMPOTENCY_KEPT: std::time::Duration = idempotency::KEPT;
mod status;
pub mod views;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi};

pub use error::ApiError;
pub use guard::client_address;

use crate::auth::{self, Caller};

use crate::context::Context;
use crate::model::{InvalidInput, NotifyUrl, RentalStatus, TenantKey, Username};
use crate::rentals::{self, RentRequest};
use crate::store::Constraints;
use views::{
    CreatedToken, ErrorBody, EventPage, FleetWorkerView, RenewBody, RentBody, RentalList,
    RentalView, RentedView, TokenBody, TokenList, WorkerList, WorkerView,
};

/// Largest request body accepted; a rent request is a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(ApiError::Forbidden("this needs the admin token".into())),
    }
}

/// One route: its method and path, and what answers it.
struct Endpoint {
    method: Method,
    path: &'static str,
    handler: MethodRouter<Context>,
}

fn endpoint<H, T>(method: Method, path: &'static str, handler: H) -> Endpoint
where
    H: Handler<T, Context>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
    Endpoint {
        method,
        path,
        handler: axum::routing::on(filter, handler),
    }
}

/// Every route, the one list the router is built from and the OpenAPI test checks
/// ([`ApiDoc`] must describe each).
fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::POST, "/api/rent", rent),
        endpoint(Method::GET, "/api/rentals", list_rentals),
        endpoint(Method::GET, "/api/rentals/{id}", get_rental),
        endpoint(Method::DELETE, "/api/rentals/{id}", release_rental),
        endpoint(Method::POST, "/api/rentals/{id}/renew", renew_rental),
        endpoint(Method::POST, "/api/apps", apps::create),
        endpoint(Method::GET, "/api/apps", apps::list),
        endpoint(Method::GET, "/api/apps/{name}", apps::get),
        endpoint(Method::PATCH, "/api/apps/{name}", apps::change),
        endpoint(Method::DELETE, "/api/apps/{name}", apps::delete),
        endpoint(Method::GET, "/api/apps/{name}/logs", apps::logs),
        endpoint(Method::GET, "/api/workers", list_workers),
        endpoint(Method::POST, "/api/workers/{name}", inventory::add),
        endpoint(Method::PATCH, "/api/workers/{name}", inventory::change),
        endpoint(Method::DELETE, "/api/workers/{name}", inventory::retire),
        endpoint(Method::GET, "/api/inventory", inventory::export),
        endpoint(Method::PUT, "/api/inventory", inventory::apply),
        endpoint(Method::POST, "/api/workers/{name}/drain", drain_worker),
        endpoint(Method::POST, "/api/workers/{name}/undrain", undrain_worker),
        endpoint(Method::POST, "/api/workers/{name}/restore", restore_worker),
        endpoint(Method::GET, "/api/events", list_events),
        endpoint(Method::GET, "/api/events/stream", stream_events),
        endpoint(Method::GET, "/api/tokens", list_tokens),
        endpoint(Method::POST, "/api/tokens", create_token),
        endpoint(Method::DELETE, "/api/tokens/{id}", revoke_token),
        endpoint(Method::GET, "/api/ssh/known_hosts", known_hosts),
        endpoint(Method::GET, "/api/status", status::status),
        endpoint(Method::GET, "/api/openapi.json", openapi_json),
        endpoint(Method::GET, "/health", status::health),
        endpoint(Method::GET, "/metrics", prometheus_metrics),
        endpoint(Method::GET, "/dashboard", dashboard::page),
        endpoint(Method::GET, "/dashboard/app.js", dashboard::script),
        endpoint(Method::GET, "/dashboard/app.css", dashboard::style),
    ]
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

/// The OpenAPI 3 document of the routes of [`app`], served at `GET /api/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "Orion", description = "Rent worker machines over SSH; rentals move off dead workers."),
    paths(
        rent, list_rentals, get_rental, release_rental, renew_rental,
        apps::create, apps::list, apps::get, apps::change, apps::delete, apps::logs,
        list_workers, drain_worker, undrain_worker, restore_worker,
        inventory::add, inventory::change, inventory::retire, inventory::export, inventory::apply,
        list_events, stream_events,
        list_tokens, create_token, revoke_token,
        known_hosts, status::status, status::health, openapi_json, prometheus_metrics,
        dashboard::page, dashboard::script, dashboard::style,
    ),
    components(schemas(ErrorBody, views::ErrorDetail)),
    modifiers(&Security, &GuardAnswers),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The ways to present a token: Bearer, or (to read) Basic with the token as password.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "basic",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)),
        );
    }
}

/// The answers [`guard`] may give before any handler runs, added to every operation they
/// can come from, unless it lists that status itself (then its description says all):
/// 429 everywhere (requests without a valid token are rate limited), 401 where a token is
/// needed, 415 where a request changes state.
struct GuardAnswers;

impl utoipa::Modify for GuardAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            ResponseBuilder::new()
                .description(description)
                .content("application/json", body)
                .build()
        };
        // What `security(())` leaves on an open operation.
        let open = [utoipa::openapi::security::SecurityRequirement::default()];
        for item in doc.paths.paths.values_mut() {
            let reads = [
                &mut item.get,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            let changes = [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            let operations = reads.map(|op| (op, false)).into_iter();
            for (operation, changes_state) in operations.chain(changes.map(|op| (op, true))) {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                let needs_token = operation.security.as_deref() != Some(&open);
                let responses = &mut operation.responses.responses;
                for (status, applies, description) in [
                    ("429", true, RATE_LIMITED),
                    ("401", needs_token, "No valid token"),
                    ("415", changes_state, UNSUPPORTED_MEDIA_TYPE),
                ] {
                    if applies {
                        responses
                            .entry(status.to_owned())
                            .or_insert_with(|| error(description).into());
                    }
                }
            }
        }
    }
}

const RATE_LIMITED: &str =
    "Too many requests without a valid token from this address; see `Retry-After`";
const UNSUPPORTED_MEDIA_TYPE: &str = "A body not sent as `Content-Type: application/json`";

/// `GET /api/openapi.json`: open, it holds no secret.
#[utoipa::path(get, path = "/api/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "This document", content_type = "application/json")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
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
async fn rent(
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
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(keyed) = &keyed {
        // A rent cut short is failed by the loops after this long.
        let deadline = ctx.config.rent_deadline() + std::time::Duration::from_secs(30);
        let store = ctx.store.clone();
        let lookup = store.clone();
        let made = |rental_id: String| {
            let store = lookup.clone();
            async move {
                Ok(store.rental(&rental_id).await?.is_some_and(|r| {
                    !matches!(r.status, RentalStatus::Provisioning | RentalStatus::Failed)
                }))
            }
        };
        let abandon = |rental_id: String| async move {
            Ok(store
                .abandon_rent(
                    &rental_id,
                    "its request's process stopped; the rent runs again under its \
                     Idempotency-Key",
                )
                .await?)
        };
        if let idempotency::Begin::Replay(rental_id) =
            keyed.begin(&ctx, &id, deadline, made, abandon).await?
        {
            let detail = ctx
                .store
                .rental_detail(&rental_id)
                .await?
                .filter(|d| d.rental.tenant == caller.tenant())
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
    let began = id.clone();
    let key = keyed.as_ref().map(|k| k.hold(&ctx));
    let request = RentRequest {
        key,
        id: Some(id),
        tenant: caller.tenant().to_owned(),
        username,
        public_key,
        notify_url,
        token_id,
        ttl,
        max_rentals,
        constraints,
    };
    let rented = match keyed {
        None => rentals::rent(&ctx, request).await.map_err(ApiError::from),
        // The rent and the key's record in a task of their own: a client that goes away
        // mid-rent does not leave its key "running" for a retry to wait out.
        Some(keyed) => {
            let in_task = ctx.clone();
            ctx.tasks
                .spawn(async move {
                    let rented = rentals::rent(&in_task, request)
                        .await
                        .map_err(ApiError::from);
                    let made = rented.as_ref().map(|r| r.rental.rental.id.as_str());
                    keyed.end(&in_task, &began, made).await;
                    rented
                })
                .await
                .map_err(|e| ApiError::Unexpected(anyhow::anyhow!("rent task failed: {e}")))?
        }
    };
    let rented = rented?;
    let body = RentedView {
        rental: RentalView::new(rented.rental, &ctx.config.gateway.host),
        password: rented.password,
    };
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

#[utoipa::path(get, path = "/api/rentals/{id}", tag = "rentals",
    params(("id" = String, Path, description = "The rental's id")),
    responses(
        (status = 200, description = "The rental, with its placement history", body = RentalView),
        (status = 404, description = "No such rental (or another tenant's)", body = ErrorBody),
    ))]
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
    Ok(Json(RentalView::new(detail, &ctx.config.gateway.host)).into_response())
}

#[utoipa::path(get, path = "/api/rentals", tag = "rentals",
    responses(
        (status = 200, description = "Every rental not over that the caller may see", body = RentalList),
    ))]
async fn list_rentals(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    let rentals = rentals_not_over(&ctx, &caller).await?;
    Ok(Json(RentalList { rentals }).into_response())
}

/// Every rental that is not over and that `caller` may see: by status, oldest first in each.
async fn rentals_not_over(ctx: &Context, caller: &Caller) -> Result<Vec<RentalView>, ApiError> {
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
async fn release_rental(
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
    Ok(Json(RentalView::new(detail, &ctx.config.gateway.host)).into_response())
}

#[utoipa::path(get, path = "/api/workers", tag = "workers",
    responses(
        (status = 200, description = "Every worker, with the rental holding it", body = WorkerList),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
async fn list_workers(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    Ok(Json(WorkerList {
        workers: fleet(&ctx).await?,
    })
    .into_response())
}

/// What a rent asks about its worker's place, checked against the workers in service:
/// an unknown site or a label no worker carries is a mistake (422), not a wait.
async fn placement(ctx: &Context, body: &RentBody) -> Result<Constraints, ApiError> {
    let asked = body.site.is_some() || body.prefer_site.is_some() || body.labels.is_some();
    if !asked {
        return Ok(Constraints::default());
    }
    let (sites, labelled) = ctx.store.known_placement().await?;
    let known_site = |field: &'static str, site: &str| -> Result<String, ApiError> {
        crate::inventory::check_site(site).map_err(|m| InvalidInput::new(field, m))?;
        if !sites.contains(site) {
            let known: Vec<&str> = sites.iter().map(String::as_str).collect();
            return Err(InvalidInput::new(
                field,
                format!("unknown site `{site}`; the sites are: {}", known.join(", ")),
            )
            .into());
        }
        Ok(site.to_owned())
    };
    let site = body
        .site
        .as_deref()
        .map(|s| known_site("site", s))
        .transpose()?;
    let prefer_site = body
        .prefer_site
        .as_deref()
        .map(|s| known_site("prefer_site", s))
        .transpose()?;
    let labels = body.labels.clone().unwrap_or_default();
    crate::inventory::check_labels(&labels).map_err(|m| InvalidInput::new("labels", m))?;
    for (key, value) in &labels {
        if !labelled.iter().any(|l| l.get(key) == Some(value)) {
            return Err(InvalidInput::new(
                "labels",
                format!("unknown label {key}={value}: no worker in service carries it"),
            )
            .into());
        }
    }
    Ok(Constraints {
        site,
        labels,
        prefer_site,
    })
}

/// Every worker as `GET /api/workers` shows it: the stored fields, `allocated`, and
/// `rental` (`{id, tenant, username, serving}` of the rental holding it, or null).
async fn fleet(ctx: &Context) -> Result<Vec<FleetWorkerView>, ApiError> {
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
async fn drain_worker(
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
async fn undrain_worker(
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
struct RestoreBody {
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
async fn restore_worker(
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

#[utoipa::path(post, path = "/api/tokens", tag = "tokens",
    request_body = TokenBody,
    responses(
        (status = 201, description = "The token (shown once) and its record", body = CreatedToken),
        (status = 409, description = "The name differs from an existing tenant's only in case", body = ErrorBody),
        (status = 422, description = "A field is not acceptable", body = ErrorBody),
    ))]
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
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })).into_response())
}

#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token's record (never the token)", body = TokenList),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
async fn list_tokens(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let tokens = ctx.store.list_tokens().await?;
    Ok(Json(TokenList { tokens }).into_response())
}

/// Query of `DELETE /api/tokens/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RevokeQuery {
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
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only events with a larger id (0: from the start).
    #[serde(default)]
    after: u64,
    /// At most this many (1..=1000, default 100).
    limit: Option<u32>,
    /// Instead of paging from `after`: the latest this many (1..=1000).
    last: Option<u32>,
}

#[utoipa::path(get, path = "/api/events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events, oldest first", body = EventPage),
        (status = 422, description = "A bound is out of range", body = ErrorBody),
    ))]
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
    Ok(Json(EventPage { events, next }).into_response())
}

/// How often the event stream looks for new events. Polling the table (rather than an
/// in-process channel) shows the events of every Orion process sharing the database.
const STREAM_POLL: Duration = Duration::from_millis(250);

#[utoipa::path(get, path = "/api/events/stream", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event (default: from now)")),
    responses(
        (status = 200, description = "Server-Sent Events: `id` the event id, `event` its kind, `data` the Event as JSON",
            content_type = "text/event-stream", body = crate::store::Event),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
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
async fn known_hosts(State(ctx): State<Context>, _caller: Caller) -> Result<Response, ApiError> {
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

/// Prometheus text format. The fleet and rental gauges are read from the database now,
/// so they are right whichever Orion process made the changes.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
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
    let instances = ctx.store.live_instances(None).await?;
    for app in ctx.store.live_apps(None).await? {
        let (tenant, name) = (app.tenant.clone(), app.name.clone());
        metrics::gauge!(names::APP_REPLICAS, "tenant" => tenant.clone(), "app" => name.clone())
            .set(f64::from(app.replicas));
        let view = apps::view(&app, &instances, ctx.router.as_deref());
        for status in ["pending", "running", "exited", "crashloop", "stopping"] {
            let n = view.instances.iter().filter(|i| i.status == status).count();
            metrics::gauge!(names::APP_INSTANCES, "tenant" => tenant.clone(), "app" => name.clone(), "status" => status)
                .set(n as f64);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_every_route() {
        let doc = ApiDoc::openapi();
        for (method, path) in routes() {
            let item = doc
                .paths
                .paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is missing from the OpenAPI document"));
            let operation = match method {
                Method::GET => &item.get,
                Method::POST => &item.post,
                Method::DELETE => &item.delete,
                Method::PATCH => &item.patch,
                Method::PUT => &item.put,
                other => panic!("no check for {other} routes"),
            };
            assert!(
                operation.is_some(),
                "{method} {path} is missing from the OpenAPI document"
            );
        }
    }

    #[test]
    fn every_operation_has_an_id_of_its_own() {
        let doc = ApiDoc::openapi();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("DELETE", &item.delete),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
            ] {
                let Some(operation) = operation else { continue };
                let id = operation
                    .operation_id
                    .clone()
                    .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
                    panic!("operationId `{id}` names both {other} and {method} {path}");
                }
            }
        }
    }

    #[test]
    fn the_openapi_document_describes_no_route_that_does_not_exist() {
        let routes = routes();
        let doc = ApiDoc::openapi();
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                (Method::GET, &item.get),
                (Method::POST, &item.post),
                (Method::DELETE, &item.delete),
                (Method::PUT, &item.put),
                (Method::PATCH, &item.patch),
            ] {
                if operation.is_some() {
                    assert!(
                        routes.contains(&(method.clone(), path.as_str())),
                        "the document describes {method} {path}, which is no route"
                    );
                }
            }
        }
    }

    #[test]
    fn the_guards_answers_are_documented_where_they_can_come() {
        let doc = ApiDoc::openapi();
        let statuses = |path: &str, method: Method| {
            let item = &doc.paths.paths[path];
            let operation = match method {
                Method::GET => &item.get,
                Method::POST => &item.post,
                Method::PATCH => &item.patch,
                Method::PUT => &item.put,
                _ => &item.delete,
            };
            let responses = &operation.as_ref().unwrap().responses.responses;
            responses.keys().cloned().collect::<Vec<_>>()
        };
        for (method, path) in routes() {
            let listed = statuses(path, method.clone());
            let has = |status: &str| listed.iter().any(|s| s == status);
            let open = [
                "/health",
                "/api/openapi.json",
                "/dashboard/app.js",
                "/dashboard/app.css",
            ]
            .contains(&path);
            assert!(has("429"), "{method} {path}: {listed:?}");
            assert_eq!(has("401"), !open, "{method} {path}: {listed:?}");
            assert_eq!(has("415"), !method.is_safe(), "{method} {path}: {listed:?}");
        }
        // A status a route lists itself keeps its own description.
        let rent = doc.paths.paths["/api/rent"].post.as_ref().unwrap();
        let utoipa::openapi::RefOr::T(quota) = &rent.responses.responses["429"] else {
            panic!("429 of /api/rent is a reference");
        };
        assert!(quota.description.contains("quota"), "{}", quota.description);
    }
}
