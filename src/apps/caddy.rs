//! Apps behind Caddy: one stable address per app, kept in sync with its running
//! instances through Caddy's admin API.
//!
//! Each app with a port gets one route in Caddy's HTTPS server, tagged `@id
//! orion-app-<name>`, placed before the Caddyfile's own routes. It answers only
//! `https://<name>.<apps domain>/…` (`apps.<site>` unless the operator sets
//! `caddy.apps_domain`), and proxies to the app's running instances with Caddy's active
//! health checks and a retry on another instance when one cannot be reached. With no
//! instance running it answers 503 with Orion's JSON error shape.
//!
//! An app never shares an origin with Orion's API or dashboard (#24): a browser logged
//! into the dashboard sends its Basic credentials, the admin token, to every path of the
//! API's origin, and a page on that origin could call `/api/*` with them or register a
//! service worker over it. So there is no path route to an app on the site's host, and
//! the credentials a browser or a client attaches (`Authorization`,
//! `Proxy-Authorization`, `Cookie`) are removed before a request reaches an instance.
//!
//! [`Router::sync`] changes only what differs from what it last applied and checks that
//! Caddy still holds it: a lost update is corrected at the next pass, and a restarted
//! Caddy (which starts from its Caddyfile) gets every route back at the next pass.
//!
//! The admin API is reached on a unix socket (`caddy.admin = "unix:/path"`) in a volume
//! only Caddy and Orion mount, never on a network port.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

/// Prefix of the `@id` of every route Orion manages in Caddy.
pub const ROUTE_ID_PREFIX: &str = "orion-app-";

/// One app as Caddy should serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRoute {
    pub name: String,
    /// `host:port` of each running instance.
    pub upstreams: Vec<String>,
    /// What Caddy's active health check requests on each instance.
    pub health_path: String,
}

/// Request headers that carry a client's credentials: never forwarded to an instance, so
/// that no credential meant for Orion (or for another app) reaches a tenant's code.
pub const STRIPPED_HEADERS: [&str; 3] = ["Authorization", "Proxy-Authorization", "Cookie"];

/// The route of one app, as Caddy's JSON config holds it: the app's own host only.
pub fn route_json(apps_domain: &str, app: &AppRoute) -> Value {
    let serve = if app.upstreams.is_empty() {
        json!({
            "handler": "static_response",
            "status_code": 503,
            "headers": {"Content-Type": ["application/json"]},
            "body": format!(
                r#"{{"error":{{"code":"no_instance","message":"app {} has no running instance"}}}}"#,
                app.name
            ),
        })
    } else {
        json!({
            "handler": "reverse_proxy",
            "upstreams": app.upstreams.iter().map(|u| json!({"dial": u})).collect::<Vec<_>>(),
            "headers": {"request": {"delete": STRIPPED_HEADERS}},
            "load_balancing": {
                "selection_policy": {"policy": "round_robin"},
                // A request whose instance cannot be reached goes to another one.
                "try_duration": "3s",
                "try_interval": "50ms",
            },
            "health_checks": {
                "active": {"uri": app.health_path, "interval": "1s", "timeout": "1s"},
                "passive": {"fail_duration": "5s", "max_fails": 1},
            },
        })
    };
    json!({
        "@id": format!("{ROUTE_ID_PREFIX}{}", app.name),
        "match": [{"host": [app_host(apps_domain, &app.name)]}],
        "handle": [serve],
        "terminal": true,
    })
}

/// The host an app is served on: a name of its own under the apps domain.
pub fn app_host(apps_domain: &str, app: &str) -> String {
    format!("{app}.{apps_domain}")
}

/// Where Caddy's admin API is: read with the configuration (`caddy.admin`).
pub use crate::config::CaddyAdmin as Admin;

/// Keeps Caddy's app routes equal to the apps' running instances.
#[derive(Debug)]
pub struct Router {
    admin: Admin,
    /// Apps are served at `<name>.<apps_domain>`.
    apps_domain: String,
    /// The route last applied per app name, to change only what differs.
    applied: Mutex<HashMap<String, Value>>,
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    /// Apps whose route Caddy holds as wanted now.
    pub applied: Vec<String>,
    /// Apps whose route Caddy refused, with its reason: not served (or served as before
    /// the change), tried again at the next sync. Every other app's route is applied.
    pub refused: std::collections::BTreeMap<String, String>,
}

/// Caddy answered a request with an error status: it refused what was sent (its config
/// is left as it was), as opposed to not being reached at all.
#[derive(Debug, thiserror::Error)]
#[error("Caddy's admin API answered {method} {path} with {status}: {message}")]
pub struct Refusal {
    method: String,
    path: String,
    status: hyper::StatusCode,
    /// What Caddy said.
    pub message: String,
}

/// Bound on one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Router {
    pub fn new(admin: Admin, apps_domain: &str) -> Self {
        Self {
            admin,
            apps_domain: apps_domain.to_owned(),
            applied: Mutex::new(HashMap::new()),
        }
    }

    /// The HTTPS address of an app: its own origin.
    pub fn url(&self, app: &str) -> String {
        format!("https://{}/", app_host(&self.apps_domain, app))
    }

    /// Forgets what was last applied: the next [`Router::sync`] writes every route again
    /// (another process may have changed them meanwhile).
    pub fn forget(&self) {
        self.applied.lock().expect("applied poisoned").clear();
    }

    /// Makes Caddy serve exactly `apps`: adds, replaces and removes Orion's routes.
    pub async fn sync(&self, apps: &[AppRoute]) -> anyhow::Result<Synced> {
        let server = self.https_server().await?;
        let routes_path = format!("/config/apps/http/servers/{server}/routes");
        let current = self.request("GET", &routes_path, None).await?;
        let present: HashMap<String, &Value> = current
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let id = r.get("@id")?.as_str()?;
                id.starts_with(ROUTE_ID_PREFIX).then(|| (id.to_owned(), r))
            })
            .collect();
        let mut done = Synced::default();
        let mut applied = self.applied.lock().expect("applied poisoned").clone();
        // Each app's route on its own: one that Caddy refuses is reported on that app,
        // and the others are still applied (#24: one bad route stopped every app's).
        for app in apps {
            let id = format!("{ROUTE_ID_PREFIX}{}", app.name);
            let want = route_json(&self.apps_domain, app);
            let exists = present.contains_key(&id);
            if exists && applied.get(&app.name) == Some(&want) {
                done.applied.push(app.name.clone());
                continue;
            }
            let sent = if exists {
                self.request("PATCH", &format!("/id/{id}"), Some(&want))
                    .await
            } else {
                // Before the Caddyfile's own routes.
                self.request("PUT", &format!("{routes_path}/0"), Some(&want))
                    .await
            };
            match sent {
                Ok(_) => {
                    if exists {
                        done.changed += 1;
                    } else {
                        done.added += 1;
                    }
                    done.applied.push(app.name.clone());
                    applied.insert(app.name.clone(), want);
                }
                Err(e) => match e.downcast::<Refusal>() {
                    Ok(refusal) => {
                        done.refused.insert(app.name.clone(), refusal.message);
                    }
                    Err(unreached) => {
                        *self.applied.lock().expect("applied poisoned") = applied;
                        return Err(unreached);
                    }
                },
            }
        }
        for id in present.keys() {
            let name = &id[ROUTE_ID_PREFIX.len()..];
            if !apps.iter().any(|a| a.name == name) {
                self.request("DELETE", &format!("/id/{id}"), None).await?;
                applied.remove(name);
                done.removed += 1;
            }
        }
        applied.retain(|name, _| apps.iter().any(|a| &a.name == name));
        *self.applied.lock().expect("applied poisoned") = applied;
        Ok(done)
    }

    /// The name of the server that listens on Caddy's HTTPS port (the Caddyfile's site):
    /// 443 unless the Caddyfile sets `https_port` (a test's Caddy on the host's network).
    async fn https_server(&self) -> anyhow::Result<String> {
        let http = self.request("GET", "/config/apps/http", None).await?;
        let port = http["https_port"].as_u64().unwrap_or(443);
        let servers = http["servers"]
            .as_object()
            .context("Caddy has no HTTP servers configured")?;
        let suffix = format!(":{port}");
        for (name, server) in servers {
            let listens = server["listen"].as_array().into_iter().flatten();
            if listens
                .filter_map(Value::as_str)
                .any(|l| l.ends_with(&suffix))
            {
                return Ok(name.clone());
            }
        }
        bail!("no Caddy server listens on :{port}")
    }

    /// One admin API request; its JSON answer (`null` when empty).
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let work = async {
            let body = body.map(|b| serde_json::to_vec(b).expect("JSON serialises"));
            // Caddy's admin API checks the Host of what it gets: on a unix socket it
            // must be present and empty.
            let host = match &self.admin {
                Admin::Unix(_) => "",
                Admin::Tcp(addr) => addr.as_str(),
            };
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, host)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let response = match &self.admin {
                Admin::Unix(path) => {
                    let stream =
                        tokio::net::UnixStream::connect(path)
                            .await
                            .with_context(|| {
                                format!("cannot reach Caddy's admin socket {}", path.display())
                            })?;
                    send(stream, request).await?
                }
                Admin::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr)
                        .await
                        .with_context(|| format!("cannot reach Caddy's admin API at {addr}"))?;
                    send(stream, request).await?
                }
            };
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                let message = String::from_utf8_lossy(&bytes).trim().to_owned();
                // Caddy's own JSON error (`{"error": "…"}`), else what it said.
                let message = serde_json::from_str::<Value>(&message)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or(message);
                return Err(Refusal {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    status,
                    message,
                }
                .into());
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            serde_json::from_slice(&bytes).context("Caddy's admin API answered no JSON")
        };
        tokio::time::timeout(ADMIN_TIMEOUT, work)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "Caddy's admin API did not answer {method} {path} within {ADMIN_TIMEOUT:?}"
                )
            })?
    }
}

/// Sends one request on a fresh HTTP/1 connection.
async fn send<S>(
    stream: S,
    request: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(upstreams: &[&str]) -> AppRoute {
        AppRoute {
            name: "web".into(),
            upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
            health_path: "/".into(),
        }
    }

    #[test]
    fn a_route_serves_the_host_of_its_app_only_and_forwards_no_credentials() {
        let r = route_json(
            "apps.example.org",
            &app(&["10.0.0.2:8080", "10.0.0.3:8080"]),
        );
        assert_eq!(r["@id"], "orion-app-web");
        assert_eq!(r["match"], json!([{"host": ["web.apps.example.org"]}]));
        let proxy = &r["handle"][0];
        assert_eq!(proxy["handler"], "reverse_proxy");
        assert_eq!(proxy["upstreams"][1]["dial"], "10.0.0.3:8080");
        assert_eq!(
            proxy["headers"]["request"]["delete"],
            json!(["Authorization", "Proxy-Authorization", "Cookie"])
        );
        assert_eq!(proxy["health_checks"]["active"]["uri"], "/");
        assert!(proxy["load_balancing"]["try_duration"].is_string());
    }

    #[test]
    fn an_app_with_nothing_running_answers_503_in_orions_error_shape() {
        let r = route_json("apps.example.org", &app(&[]));
        let serve = &r["handle"][0];
        assert_eq!(serve["status_code"], 503);
        let body: Value = serde_json::from_str(serve["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "no_instance");
    }

    #[test]
    fn admin_addresses_are_a_unix_socket_or_plain_http() {
        assert_eq!(
            Admin::parse("unix:/run/caddy-admin/admin.sock"),
            Ok(Admin::Unix("/run/caddy-admin/admin.sock".into()))
        );
        assert_eq!(
            Admin::parse("http://127.0.0.1:2019"),
            Ok(Admin::Tcp("127.0.0.1:2019".into()))
        );
        assert!(Admin::parse("unix:relative.sock").is_err());
        assert!(Admin::parse("https://x").is_err());
        assert!(Admin::parse("http://x/y").is_err());
    }
}
