//! The apps routes: a tenant's container workloads. The handlers validate and record
//! the wish, wake the apps loop ([`crate::loops::apps`]) and answer; the loop makes the
//! workers match. A tenant sees and changes only its own apps (another's answers 404).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, parse_json};
use super::views::ErrorBody;
use crate::apps::{self, AppName, ImageRef, InstanceState};
use crate::auth::Caller;
use crate::context::Context;
use crate::model::InvalidInput;
use crate::store::{AppChange, AppRecord, InstanceRecord, NewApp};

pub(super) fn endpoints() -> Vec<Endpoint> {
    use axum::http::Method;
    vec![
        endpoint(Method::POST, "/api/apps", create),
        endpoint(Method::GET, "/api/apps", list),
        endpoint(Method::GET, "/api/apps/{name}", get),
        endpoint(Method::PATCH, "/api/apps/{name}", change),
        endpoint(Method::DELETE, "/api/apps/{name}", delete),
        endpoint(Method::GET, "/api/apps/{name}/logs", logs),
    ]
}

/// Body of `POST /api/apps`. Unknown fields are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppBody {
    /// Required: a DNS label, unique among the tenant's apps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Required: the container image, e.g. `orion/demo-app:latest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How many instances, each on a worker of its own (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The program and its arguments, instead of the image's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment variables (never shown back: they may be secrets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// The port the app listens on, reachable at each instance's `host`, and through
    /// Caddy at the app's `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// What Caddy's health check requests on each instance (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
}

/// Body of `PATCH /api/apps/{name}`: what to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppPatch {
    /// Scale to this many instances.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Roll to this image: instances are replaced one at a time, each new one running
    /// before an old one goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// An app as its tenant sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppView {
    pub name: String,
    pub tenant: String,
    pub image: String,
    pub replicas: u32,
    /// Instances running the current image.
    pub ready: u32,
    pub port: Option<u16>,
    /// Where the app answers through Caddy, on an origin of its own
    /// (`https://<name>.apps.<site>/`): `null` without a port, or when apps are not
    /// routed through Caddy.
    pub url: Option<String>,
    /// Why Caddy refused the app's route, if it did: the app is not served (or served as
    /// before its last change) until that is fixed; every other app is served.
    pub route_error: Option<String>,
    pub health_path: String,
    pub command: Option<Vec<String>>,
    /// The names of its environment variables (their values are never shown).
    pub env: Vec<String>,
    /// Bumped by each change of image.
    pub generation: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub instances: Vec<InstanceView>,
}

/// One instance of an app.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceView {
    pub id: u64,
    pub worker: String,
    pub container: String,
    /// `pending`, `running`, `crashloop` (exited, waiting out its back-off), `exited`
    /// (to be started again now) or `stopping`.
    pub status: String,
    /// Where the app's `port` is reached on this instance (`null`: no port).
    pub host: Option<String>,
    pub port: Option<u16>,
    pub generation: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub restarts: u32,
    /// The code of its last exit.
    pub exit_code: Option<i32>,
    /// Why its last start failed, or the tail of its log at its last exit.
    pub last_error: Option<String>,
    /// When a crash-looping instance is started again.
    pub next_start_at: Option<DateTime<Utc>>,
}

/// `GET /api/apps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppList {
    pub apps: Vec<AppView>,
}

/// The view of `app`, with its instances among `instances`; `router`: apps are routed
/// through Caddy.
pub fn view(
    app: &AppRecord,
    instances: &[InstanceRecord],
    router: Option<&crate::apps::caddy::Router>,
) -> AppView {
    let now = Utc::now();
    let mine: Vec<&InstanceRecord> = instances.iter().filter(|i| i.app_id == app.id).collect();
    let ready = mine
        .iter()
        .filter(|i| i.state == InstanceState::Running && i.generation == app.generation)
        .count() as u32;
    AppView {
        name: app.name.clone(),
        tenant: app.tenant.clone(),
        image: app.image.clone(),
        replicas: app.replicas,
        ready,
        port: app.port,
        url: router
            .filter(|_| app.port.is_some())
            .map(|r| r.url(&app.name)),
        route_error: app.route_error.clone(),
        health_path: app.health_path.clone(),
        command: app.command(),
        env: app.env().into_keys().collect(),
        generation: app.generation,
        created_at: app.created_at,
        updated_at: app.updated_at,
        instances: mine
            .into_iter()
            .map(|i| InstanceView {
                id: i.id,
                worker: i.worker.clone(),
                container: i.container.clone(),
                status: match i.state {
                    InstanceState::Exited if i.next_start_at.is_some_and(|t| t > now) => {
                        "crashloop".to_owned()
                    }
                    other => other.to_string(),
                },
                host: app.port.map(|_| i.host.clone()),
                port: app.port,
                generation: i.generation,
                started_at: i.started_at,
                restarts: i.restarts,
                exit_code: i.exit_code,
                last_error: i.last_error.clone(),
                next_start_at: i.next_start_at,
            })
            .collect(),
    }
}

/// Query of the routes naming one app: the admin may name another tenant's.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AppQuery {
    /// Admin only: the tenant whose app this is (default: the admin's own).
    tenant: Option<String>,
}

/// The app `name` of the caller (or, for the admin, of `?tenant=`); another tenant's
/// answers exactly like a missing one.
async fn find(
    ctx: &Context,
    caller: &Caller,
    name: &str,
    query: Result<Query<AppQuery>, QueryRejection>,
) -> Result<AppRecord, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let tenant = match (&query.tenant, caller) {
        (Some(t), Caller::Admin) => t.as_str(),
        (Some(_), Caller::Tenant(_)) => {
            return Err(ApiError::Forbidden(
                "only the admin may name a tenant".into(),
            ));
        }
        (None, _) => caller.tenant(),
    };
    ctx.store
        .app_by_name(tenant, name)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such app".into()))
}

async fn answer(ctx: &Context, app: &AppRecord, status: StatusCode) -> Result<Response, ApiError> {
    let instances = ctx.store.live_instances(Some(app.id)).await?;
    Ok((status, Json(view(app, &instances, ctx.router.as_deref()))).into_response())
}

#[utoipa::path(post, path = "/api/apps", operation_id = "create_app", tag = "apps",
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and body again answer the app the first request made (201, `Idempotent-Replayed: true`)")),
    request_body = AppBody,
    responses(
        (status = 201, description = "Recorded: its instances are being placed", body = AppView),
        (status = 409, description = "An app (of any tenant: the name is its address) has this name", body = ErrorBody),
        (status = 422, description = "A field is not acceptable", body = ErrorBody),
        (status = 429, description = "The tenant's instance quota is reached", body = ErrorBody),
    ))]
pub async fn create(
    State(ctx): State<Context>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: AppBody = parse_json(&raw)?;
    let keyed = super::idempotency::key_of(&headers)?
        .map(|key| super::idempotency::Keyed::new(caller.tenant(), "apps", key, &raw));
    // Validate everything before anything is written or run.
    let name = AppName::parse(
        body.name
            .as_deref()
            .ok_or_else(|| InvalidInput::new("name", "is required"))?,
    )?;
    let image = ImageRef::parse(
        body.image
            .as_deref()
            .ok_or_else(|| InvalidInput::new("image", "is required"))?,
    )?;
    let replicas = apps::check_replicas(body.replicas.unwrap_or(1))?;
    if let Some(command) = &body.command {
        apps::check_command(command)?;
    }
    let env = body.env.unwrap_or_default();
    apps::check_env(&env)?;
    let port = body.port.map(apps::check_port).transpose()?;
    let health_path = body.health_path.unwrap_or_else(|| "/".to_owned());
    apps::check_health_path(&health_path)?;
    if let Some(keyed) = &keyed {
        let store = ctx.store.clone();
        let tenant = caller.tenant().to_owned();
        let made = |name: String| {
            let (store, tenant) = (store.clone(), tenant.clone());
            async move { Ok(store.app_by_name(&tenant, &name).await?.is_some()) }
        };
        // Recording an app is one short transaction: a minute covers any retry.
        let deadline = std::time::Duration::from_secs(60);
        if let super::idempotency::Begin::Replay(name) =
            // Nothing is left half-made by a creation cut short: one transaction.
            keyed
                .begin(&ctx, name.as_str(), deadline, made, |_| async { Ok(true) })
                .await?
        {
            let app = ctx
                .store
                .app_by_name(caller.tenant(), &name)
                .await?
                .ok_or_else(|| ApiError::NotFound("the key's app is gone".into()))?;
            let mut answer = answer(&ctx, &app, StatusCode::CREATED).await?;
            answer.headers_mut().insert(
                super::idempotency::REPLAYED,
                axum::http::HeaderValue::from_static("true"),
            );
            return Ok(answer);
        }
    }
    let created = ctx
        .store
        .create_app(&NewApp {
            tenant: caller.tenant().to_owned(),
            name: name.as_str().to_owned(),
            image: image.as_str().to_owned(),
            replicas,
            command: body.command,
            env,
            port,
            health_path,
            max_instances: instance_limit(&ctx, &caller),
        })
        .await
        .map_err(ApiError::from);
    if let Some(keyed) = &keyed {
        keyed
            .end(
                &ctx,
                name.as_str(),
                created.as_ref().ok().map(|a| a.name.as_str()),
            )
            .await;
    }
    let app = created?;
    ctx.wake.apps.notify_one();
    answer(&ctx, &app, StatusCode::CREATED).await
}

/// The most instances the caller's apps may ask for in all: a tenant's
/// `apps.max_instances_per_tenant`; the admin's are not bounded.
fn instance_limit(ctx: &Context, caller: &Caller) -> Option<u32> {
    match caller {
        Caller::Admin => None,
        Caller::Tenant(_) => Some(ctx.config.apps.max_instances_per_tenant),
    }
}

#[utoipa::path(get, path = "/api/apps", operation_id = "list_apps", tag = "apps",
    responses((status = 200, description = "The caller's apps (the admin: every app)", body = AppList)))]
pub async fn list(State(ctx): State<Context>, caller: Caller) -> Result<Response, ApiError> {
    let apps = ctx.store.live_apps(caller.scope()).await?;
    let instances = ctx.store.live_instances(None).await?;
    let apps = apps
        .iter()
        .map(|a| view(a, &instances, ctx.router.as_deref()))
        .collect();
    Ok(Json(AppList { apps }).into_response())
}

#[utoipa::path(get, path = "/api/apps/{name}", operation_id = "get_app", tag = "apps",
    params(("name" = String, Path, description = "The app's name"), AppQuery),
    responses(
        (status = 200, description = "The app and its instances", body = AppView),
        (status = 404, description = "No such app (or another tenant's)", body = ErrorBody),
    ))]
pub async fn get(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<AppQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let app = find(&ctx, &caller, &name, query).await?;
    answer(&ctx, &app, StatusCode::OK).await
}

#[utoipa::path(patch, path = "/api/apps/{name}", operation_id = "change_app", tag = "apps",
    params(("name" = String, Path, description = "The app's name"), AppQuery),
    request_body = AppPatch,
    responses(
        (status = 200, description = "Changed: its instances follow", body = AppView),
        (status = 404, description = "No such app", body = ErrorBody),
        (status = 422, description = "A field is not acceptable, or nothing to change", body = ErrorBody),
        (status = 429, description = "The tenant's instance quota is reached", body = ErrorBody),
    ))]
pub async fn change(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<AppQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::from_body_rejection(&e))?;
    let body: AppPatch = parse_json(&body)?;
    let replicas = body.replicas.map(apps::check_replicas).transpose()?;
    let image = body.image.as_deref().map(ImageRef::parse).transpose()?;
    if replicas.is_none() && image.is_none() {
        return Err(InvalidInput::new("replicas", "give `replicas` or `image` to change").into());
    }
    let app = find(&ctx, &caller, &name, query).await?;
    let change = AppChange {
        replicas,
        image: image.map(|i| i.as_str().to_owned()),
        max_instances: instance_limit(&ctx, &caller),
    };
    let app = ctx
        .store
        .change_app(app.id, &change)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such app".into()))?;
    ctx.wake.apps.notify_one();
    answer(&ctx, &app, StatusCode::OK).await
}

#[utoipa::path(delete, path = "/api/apps/{name}", operation_id = "delete_app", tag = "apps",
    params(("name" = String, Path, description = "The app's name"), AppQuery),
    responses(
        (status = 204, description = "Deleted: its instances are being removed from their workers"),
        (status = 404, description = "No such app", body = ErrorBody),
    ))]
pub async fn delete(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<AppQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let app = find(&ctx, &caller, &name, query).await?;
    if !ctx.store.delete_app(app.id).await? {
        return Err(ApiError::NotFound("no such app".into()));
    }
    ctx.wake.apps.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/apps/{name}/logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Admin only: the tenant whose app this is.
    tenant: Option<String>,
    /// The instance (default: the app's first).
    instance: Option<u64>,
    /// How many lines, from the end (1..=1000, default 100).
    lines: Option<u32>,
}

#[utoipa::path(get, path = "/api/apps/{name}/logs", operation_id = "app_logs", tag = "apps",
    params(("name" = String, Path, description = "The app's name"), LogsQuery),
    responses(
        (status = 200, description = "The last lines of the instance's log", content_type = "text/plain"),
        (status = 404, description = "No such app or instance", body = ErrorBody),
        (status = 429, description = "Too many reads by this tenant, or by all at once: try again after `Retry-After`", body = ErrorBody),
        (status = 502, description = "The worker could not be read", body = ErrorBody),
    ))]
pub async fn logs(
    State(ctx): State<Context>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let lines = query.lines.unwrap_or(100);
    if !(1..=1000).contains(&lines) {
        return Err(InvalidInput::new("lines", "must be between 1 and 1000").into());
    }
    let app = find(
        &ctx,
        &caller,
        &name,
        Ok(Query(AppQuery {
            tenant: query.tenant,
        })),
    )
    .await?;
    // Bounded per tenant and in all, before anything runs on the worker.
    let turn = ctx
        .reads
        .start(caller.tenant(), ctx.clock.now())
        .map_err(|refused| ApiError::TooManyReads(refused.retry_after))?;
    let instances = ctx.store.live_instances(Some(app.id)).await?;
    let instance = match query.instance {
        Some(id) => instances.iter().find(|i| i.id == id),
        None => instances.first(),
    }
    .ok_or_else(|| ApiError::NotFound("no such instance of this app".into()))?;
    let worker = ctx
        .store
        .worker_by_name(&instance.worker)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such worker".into()))?;
    let text = apps::runtime::instance_logs(
        &ctx.reads_ssh,
        &worker,
        &instance.node,
        &instance.container,
        lines,
    )
    .await
    .map_err(|e| {
        ApiError::Provisioning(format!("cannot read the log on {}: {e:#}", worker.name))
    })?;
    turn.charge(text.len(), ctx.clock.now());
    drop(turn);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
