//! The client side of the `orion` command: talks to the API (through Caddy or directly)
//! and prints human-readable tables, or JSON with `--json`.
//!
//! - this file: the HTTP client, which reads the API's answers as the API's own types
//!   ([`crate::api::views`]), and its errors;
//! - [`commands`]: the client commands as the command line declares them (`clap`), and
//!   what each does and prints;
//! - [`tables`]: how tables, cells and event lines look.
//!
//! Exit codes scripts can rely on: 0 success; 1 the request was refused (4xx); 2 bad
//! usage or local input; 3 the service is unavailable or unreachable (5xx, network).

use std::path::{Path, PathBuf};

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde::de::DeserializeOwned;

use crate::api::apps::{AppBody, AppList, AppPatch, AppView};
use crate::api::inventory::{InventoryBody, InventoryChanges};
use crate::api::views::{
    ErrorBody, EventPage, RentBody, RentalList, RentedView, WorkerList, WorkerView,
};
use crate::store::Event;

mod commands;
mod tables;

pub use commands::{AppAction, Command, InventoryAction, Invocation, healthcheck, run};
pub use tables::{cell, event_line, table};

/// Where the API is and who is calling: the `--url`, `--token` and `--cacert` of every
/// client command (the field docs are their help).
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// API base URL (through Caddy: https://localhost).
    #[arg(long, env = "ORION_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (admin or tenant).
    #[arg(long, env = "ORION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM root certificate to trust (Caddy's internal CA).
    #[arg(long, env = "ORION_CACERT")]
    pub cacert: Option<PathBuf>,
}

/// A failed command, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unavailable(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused(_) => 1,
            ClientError::Usage(_) => 2,
            ClientError::Unavailable(_) => 3,
        }
    }
}

/// The API client.
pub struct Client {
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &endpoint.cacert {
            let pem = std::fs::read(path).map_err(|e| {
                ClientError::Usage(format!("cannot read --cacert {}: {e}", path.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ClientError::Usage(format!(
                    "--cacert {} is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self { http, endpoint })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.endpoint.url.trim_end_matches('/'));
        let req = self.http.request(method, url);
        match &self.endpoint.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends a request and returns the response if it succeeded, else the error kind
    /// above with the API's own message ([`ErrorBody`]), or the bare status.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|e| {
            ClientError::Unavailable(format!("cannot reach {}: {e}", self.endpoint.url))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let message = match resp.json::<ErrorBody>().await {
            Ok(body) => format!("{} (HTTP {})", body.error.message, status.as_u16()),
            Err(_) => format!("HTTP {status}"),
        };
        if status.is_server_error() {
            Err(ClientError::Unavailable(message))
        } else {
            Err(ClientError::Refused(message))
        }
    }

    /// Sends a request and reads its answer as `T`.
    async fn fetch<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(req).await?.json().await.map_err(|e| {
            ClientError::Unavailable(format!("unexpected answer from {}: {e}", self.endpoint.url))
        })
    }

    /// Rents a worker: `body` with the public key read from `key`, if given.
    pub async fn rent(
        &self,
        key: Option<&Path>,
        mut body: RentBody,
    ) -> Result<RentedView, ClientError> {
        body.ssh_public_key = key
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|text| text.trim().to_owned())
                    .map_err(|e| {
                        ClientError::Usage(format!("cannot read --key {}: {e}", path.display()))
                    })
            })
            .transpose()?;
        self.fetch(self.request(reqwest::Method::POST, "/api/rent").json(&body))
            .await
    }

    /// The inventory Orion holds, as a file.
    pub async fn inventory(&self) -> Result<String, ClientError> {
        self.text(self.request(reqwest::Method::GET, "/api/inventory"))
            .await
    }

    /// Sends an inventory file's text to be applied (or, `dry_run`, only compared).
    pub async fn apply_inventory(
        &self,
        text: &str,
        dry_run: bool,
    ) -> Result<InventoryChanges, ClientError> {
        let body = InventoryBody {
            inventory: Some(text.to_owned()),
            dry_run,
        };
        self.fetch(
            self.request(reqwest::Method::PUT, "/api/inventory")
                .json(&body),
        )
        .await
    }

    /// Sends a request and reads its answer as text.
    async fn text(&self, req: reqwest::RequestBuilder) -> Result<String, ClientError> {
        self.send(req).await?.text().await.map_err(|e| {
            ClientError::Unavailable(format!("unexpected answer from {}: {e}", self.endpoint.url))
        })
    }

    /// The `@cert-authority` line of Orion's host CA, for `~/.ssh/known_hosts`.
    pub async fn known_hosts(&self) -> Result<String, ClientError> {
        self.text(self.request(reqwest::Method::GET, "/api/ssh/known_hosts"))
            .await
    }

    /// Releases a rental (204, no body).
    pub async fn release(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/rentals/{id}")))
            .await?;
        Ok(())
    }

    pub async fn rentals(&self) -> Result<RentalList, ClientError> {
        self.fetch(self.request(reqwest::Method::GET, "/api/rentals"))
            .await
    }

    pub async fn workers(&self) -> Result<WorkerList, ClientError> {
        self.fetch(self.request(reqwest::Method::GET, "/api/workers"))
            .await
    }

    pub async fn drain(&self, worker: &str, drained: bool) -> Result<WorkerView, ClientError> {
        let action = if drained { "drain" } else { "undrain" };
        self.fetch(self.request(
            reqwest::Method::POST,
            &format!("/api/workers/{worker}/{action}"),
        ))
        .await
    }

    pub async fn restore(
        &self,
        worker: &str,
        forget_host_key: bool,
    ) -> Result<WorkerView, ClientError> {
        self.fetch(
            self.request(
                reqwest::Method::POST,
                &format!("/api/workers/{worker}/restore"),
            )
            .json(&serde_json::json!({ "forget_host_key": forget_host_key })),
        )
        .await
    }

    pub async fn apps(&self) -> Result<AppList, ClientError> {
        self.fetch(self.request(reqwest::Method::GET, "/api/apps"))
            .await
    }

    pub async fn app(&self, name: &str) -> Result<AppView, ClientError> {
        self.fetch(self.request(reqwest::Method::GET, &app_path(name)))
            .await
    }

    pub async fn create_app(&self, body: &AppBody) -> Result<AppView, ClientError> {
        self.fetch(self.request(reqwest::Method::POST, "/api/apps").json(body))
            .await
    }

    pub async fn change_app(&self, name: &str, patch: &AppPatch) -> Result<AppView, ClientError> {
        self.fetch(
            self.request(reqwest::Method::PATCH, &app_path(name))
                .json(patch),
        )
        .await
    }

    /// Deletes an app (204, no body).
    pub async fn delete_app(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &app_path(name)))
            .await?;
        Ok(())
    }

    /// The last `lines` lines of an instance's log, as text.
    pub async fn app_logs(
        &self,
        name: &str,
        instance: Option<u64>,
        lines: u32,
    ) -> Result<String, ClientError> {
        let mut path = format!("{}/logs?lines={lines}", app_path(name));
        if let Some(id) = instance {
            path.push_str(&format!("&instance={id}"));
        }
        let resp = self.send(self.request(reqwest::Method::GET, &path)).await?;
        resp.text().await.map_err(|e| {
            ClientError::Unavailable(format!("the log could not be read to the end: {e}"))
        })
    }

    /// The latest `last` events, oldest first.
    pub async fn latest_events(&self, last: u32) -> Result<EventPage, ClientError> {
        self.fetch(self.request(reqwest::Method::GET, &format!("/api/events?last={last}")))
            .await
    }

    /// Follows the live event stream, calling `each` with every event, until the server
    /// closes it.
    pub async fn follow_events(&self, mut each: impl FnMut(&Event)) -> Result<(), ClientError> {
        let resp = self
            .send(self.request(reqwest::Method::GET, "/api/events/stream"))
            .await?;
        let mut events = resp.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event =
                event.map_err(|e| ClientError::Unavailable(format!("the stream broke: {e}")))?;
            if let Ok(event) = serde_json::from_str::<Event>(&event.data) {
                each(&event);
            }
        }
        Ok(())
    }
}

/// The path of an app: its name percent-encoded (a bad name is the API's to refuse).
fn app_path(name: &str) -> String {
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("/api/apps/{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_separate_refusals_usage_and_outages() {
        assert_eq!(ClientError::Refused("x".into()).exit_code(), 1);
        assert_eq!(ClientError::Usage("x".into()).exit_code(), 2);
        assert_eq!(ClientError::Unavailable("x".into()).exit_code(), 3);
    }
}
