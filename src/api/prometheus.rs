//! `GET /metrics`: Orion's metrics in Prometheus' text format, for the admin.

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, require_admin};
use super::views::ErrorBody;
use crate::auth::Caller;
use crate::context::Context;

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![endpoint(Method::GET, "/metrics", prometheus_metrics)]
}

/// Prometheus text format. The fleet and rental gauges are read from the database now,
/// so they are right whichever Orion process made the changes.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
pub(super) async fn prometheus_metrics(
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
        let view = super::apps::view(&app, &instances, ctx.router.as_deref());
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
