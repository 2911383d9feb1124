//! The live dashboard: `GET /dashboard`, a page for the operator showing the workers,
//! the rentals and the latest events, kept current by a small script that follows the
//! event stream (`web/dashboard.js`). Read-only.
//!
//! The page is rendered on the server with its own minijinja environment, which escapes
//! every value as HTML (the playbooks' environment quotes for the shell instead). The
//! template, script and style are compiled into the binary, so the page needs no files
//! at run time and no front-end build.
//!
//! A browser cannot put a token in an `Authorization: Bearer` header by itself, so the
//! page asks for HTTP Basic credentials (any user name, the admin token as the
//! password); the browser then sends them with the script's requests to the API too.
//! Those are reads: Basic credentials never change anything (`guard`), since a browser
//! also sends them with requests a page on another site makes it send. A control added
//! here that changes state must send the token as `Authorization: Bearer` and JSON.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::json;

use super::error::ApiError;
use super::handler::{Endpoint, endpoint};
use crate::auth::Caller;
use crate::context::Context;

/// How many events the page starts with (the newest); the script keeps as many.
const EVENTS_SHOWN: u32 = 50;

const TEMPLATE: &str = "dashboard.html.j2";

/// Only the page's own script and style, and requests to its own origin: an injected
/// tag could neither run nor send anything anywhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The page's environment, built once: HTML auto-escaping for every template, and an
/// undefined value is an error rather than an empty string.
static PAGES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.add_filter("clock", clock);
    env.add_filter("short", short);
    env.add_template(TEMPLATE, include_str!("../../web/dashboard.html.j2"))
        .expect("the dashboard template parses");
    env
});

/// `2026-05-01T12:03:04.123456Z` → `2026-05-01 12:03:04` (UTC); none → `—`. The script's
/// `clock` does the same to what the API returns.
fn clock(value: Option<String>) -> String {
    match value {
        Some(iso) => iso.replacen('T', " ", 1).chars().take(19).collect(),
        None => "—".to_owned(),
    }
}

pub(super) fn endpoints() -> Vec<Endpoint> {
    use axum::http::Method;
    vec![
        endpoint(Method::GET, "/dashboard", page),
        endpoint(Method::GET, "/dashboard/app.js", script),
        endpoint(Method::GET, "/dashboard/app.css", style),
    ]
}

/// The first 8 characters of a rental id: enough to tell rentals apart on the page.
fn short(id: String) -> String {
    id.chars().take(8).collect()
}

/// `GET /dashboard`: the page, admin only.
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The live dashboard", content_type = "text/html", body = String),
        (status = 401, description = "No credentials: asks for Basic", body = super::views::ErrorBody),
        (status = 403, description = "A tenant token", body = super::views::ErrorBody),
    ))]
pub(super) async fn page(
    State(ctx): State<Context>,
    caller: Result<Caller, ApiError>,
) -> Result<Response, ApiError> {
    match caller {
        Ok(Caller::Admin) => {}
        Ok(Caller::Tenant(_)) => {
            return Err(ApiError::Forbidden(
                "the dashboard shows the whole fleet: it needs the admin token".into(),
            ));
        }
        // Ask for Basic credentials, so that a browser prompts for them.
        Err(ApiError::Unauthorized(_)) => {
            return Err(ApiError::LoginRequired(
                "the dashboard needs the admin token: log in with any user name and the \
                 token as the password"
                    .into(),
            ));
        }
        Err(other) => return Err(other),
    }
    let workers = super::workers::fleet(&ctx).await?;
    let rentals = super::rentals::rentals_not_over(&ctx, &Caller::Admin).await?;
    let instances = ctx.store.live_instances(None).await?;
    let apps: Vec<_> = ctx
        .store
        .live_apps(None)
        .await?
        .iter()
        .map(|a| super::apps::view(a, &instances, ctx.router.as_deref()))
        .collect();
    let mut events = ctx.store.latest_events(EVENTS_SHOWN).await?;
    events.reverse();
    let last_event_id = events.first().map_or(0, |e| e.id);
    let html = PAGES
        .get_template(TEMPLATE)
        .and_then(|t| {
            t.render(json!({
                "workers": workers,
                "rentals": rentals,
                "apps": apps,
                "events": events,
                "last_event_id": last_event_id,
                "now": chrono::Utc::now(),
            }))
        })
        .map_err(|e| {
            ApiError::Unexpected(anyhow::Error::new(e).context("rendering the dashboard"))
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            // Fleet data: never kept by a cache.
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        html,
    )
        .into_response())
}

/// `GET /dashboard/app.js`. The script and the style hold no data and are the same for
/// everyone, so they are served without credentials.
#[utoipa::path(get, path = "/dashboard/app.js", tag = "dashboard", security(()),
    responses((status = 200, description = "The dashboard's script", content_type = "text/javascript", body = String)))]
pub(super) async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../web/dashboard.js"),
    )
}

/// `GET /dashboard/app.css`.
#[utoipa::path(get, path = "/dashboard/app.css", tag = "dashboard", security(()),
    responses((status = 200, description = "The dashboard's style", content_type = "text/css", body = String)))]
pub(super) async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../web/dashboard.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Revalidated each time: a new Orion's page never runs an old script.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(ctx: serde_json::Value) -> String {
        PAGES.get_template(TEMPLATE).unwrap().render(ctx).unwrap()
    }

    fn sample() -> serde_json::Value {
        json!({
            "workers": [{
                "name": "worker_1", "status": "dead", "drained": false, "retired": false,
                "quarantine_reason": null, "last_checked": "2026-05-01T12:03:04.123456Z",
                "probe_latency_ms": null, "last_probe_error": "connection refused",
                "rental": { "id": "0123456789abcdef", "tenant": "acme", "username": "ivan",
                            "serving": false },
            }],
            "rentals": [{
                "id": "0123456789abcdef", "username": "ivan", "tenant": "acme",
                "worker": "worker_2", "status": "active", "host": "localhost", "port": 22222,
                "endpoint": { "host": "localhost", "port": 2200 },
                "last_snapshot_at": "2026-05-01T12:02:00Z",
                "created_at": "2026-05-01T12:00:00Z",
            }],
            "apps": [{
                "name": "web", "tenant": "acme", "image": "orion/demo-app", "ready": 1,
                "replicas": 2,
                "instances": [{"id": 4, "worker": "worker_2", "status": "running", "restarts": 0},
                              {"id": 5, "worker": "worker_3", "status": "crashloop", "restarts": 3}],
            }],
            "events": [{
                "id": 7, "at": "2026-05-01T12:03:05Z", "kind": "worker.dead",
                "worker": "worker_1", "rental_id": null,
                "message": "<img src=x onerror=alert(1)> & \"quotes\"",
            }],
            "last_event_id": 7,
            "now": "2026-05-01T12:04:00Z",
        })
    }

    #[test]
    fn rows_carry_stable_ids_and_the_state_the_test_reads() {
        let html = render(sample());
        assert!(
            html.contains(
                r#"<tr id="worker-worker_1" data-status="dead" data-rental="0123456789abcdef">"#
            ),
            "{html}"
        );
        assert!(
            html.contains(
                r#"<tr id="rental-0123456789abcdef" data-status="active" data-worker="worker_2">"#
            ),
            "{html}"
        );
        assert!(
            html.contains(r#"<tr id="app-acme-web" data-ready="1" data-replicas="2">"#),
            "{html}"
        );
        assert!(html.contains("worker_3: crashloop"), "{html}");
        assert!(
            html.contains(r#"<tr id="event-7" data-kind="worker.dead">"#),
            "{html}"
        );
        assert!(html.contains("ivan (acme) — awaiting cleanup"), "{html}");
        assert!(html.contains("2026-05-01 12:03:04"), "{html}");
        assert!(html.contains(r#"data-last-event-id="7""#), "{html}");
        assert!(html.contains(">01234567<"), "short rental id: {html}");
    }

    #[test]
    fn every_value_is_html_escaped() {
        let html = render(sample());
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt; &amp; &quot;quotes&quot;"),
            "{html}"
        );
    }

    #[test]
    fn empty_tables_say_so() {
        let html = render(json!({
            "workers": [], "rentals": [], "apps": [], "events": [], "last_event_id": 0, "now": null,
        }));
        assert!(html.contains("no workers in the inventory"));
        assert!(html.contains("no rentals"));
        assert!(html.contains("no apps"));
        assert!(html.contains("no events yet"));
    }

    #[test]
    fn clock_shows_utc_seconds_and_a_dash_for_never() {
        assert_eq!(
            clock(Some("2026-05-01T12:03:04.5Z".into())),
            "2026-05-01 12:03:04"
        );
        assert_eq!(
            clock(Some("2026-05-01T12:03:04Z".into())),
            "2026-05-01 12:03:04"
        );
        assert_eq!(clock(None), "—");
    }
}
