//! The client side of the `orion` command: talks to the API (through Caddy or directly)
//! and prints human-readable tables, or JSON with `--json`.
//!
//! - this file: the HTTP client and its errors;
//! - [`commands`]: one function per client command, printing its result;
//! - [`tables`]: how tables, cells and event lines look.
//!
//! Exit codes scripts can rely on: 0 success; 1 the request was refused (4xx); 2 bad
//! usage or local input; 3 the service is unavailable or unreachable (5xx, network).

use std::path::{Path, PathBuf};

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::Value;

use crate::api::views::RentBody;

mod commands;
mod tables;

pub use commands::{Command, healthcheck, run};
pub use tables::{cell, event_line, table};

/// Where the API is and who is calling.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Base URL, e.g. `https://localhost` or `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer token (admin or tenant).
    pub token: Option<String>,
    /// A PEM root certificate to trust (Caddy's internal CA).
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

    /// Sends a request and returns its JSON body (`null` for 204), mapping failures to
    /// the error kinds above with the API's own message.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(|e| {
            ClientError::Unavailable(format!("cannot reach {}: {e}", self.endpoint.url))
        })?;
        let status = resp.status();
        let body: Value = if status == reqwest::StatusCode::NO_CONTENT {
            Value::Null
        } else {
            resp.json().await.unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"].as_str().map_or_else(
            || format!("HTTP {status}"),
            |m| format!("{m} (HTTP {})", status.as_u16()),
        );
        if status.is_server_error() {
            Err(ClientError::Unavailable(message))
        } else {
            Err(ClientError::Refused(message))
        }
    }

    pub async fn rent(
        &self,
        key: Option<&Path>,
        username: Option<&str>,
    ) -> Result<Value, ClientError> {
        let ssh_public_key = key
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|text| text.trim().to_owned())
                    .map_err(|e| {
                        ClientError::Usage(format!("cannot read --key {}: {e}", path.display()))
                    })
            })
            .transpose()?;
        let body = RentBody {
            ssh_public_key,
            username: username.map(str::to_owned),
            ..RentBody::default()
        };
        self.send(self.request(reqwest::Method::POST, "/api/rent").json(&body))
            .await
    }

    pub async fn release(&self, id: &str) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/api/rentals/{id}")))
            .await
    }

    pub async fn rentals(&self) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/api/rentals"))
            .await
    }

    pub async fn workers(&self) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/api/workers"))
            .await
    }

    pub async fn drain(&self, worker: &str, drained: bool) -> Result<Value, ClientError> {
        let action = if drained { "drain" } else { "undrain" };
        self.send(self.request(
            reqwest::Method::POST,
            &format!("/api/workers/{worker}/{action}"),
        ))
        .await
    }

    /// The latest `last` events, oldest first.
    pub async fn latest_events(&self, last: u32) -> Result<Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, &format!("/api/events?last={last}")))
            .await
    }

    /// Follows the live event stream, calling `each` with every event, until the server
    /// closes it.
    pub async fn follow_events(&self, mut each: impl FnMut(&Value)) -> Result<(), ClientError> {
        let resp = self
            .request(reqwest::Method::GET, "/api/events/stream")
            .send()
            .await
            .map_err(|e| {
                ClientError::Unavailable(format!("cannot reach {}: {e}", self.endpoint.url))
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(if status.is_server_error() {
                ClientError::Unavailable(format!("HTTP {status}"))
            } else {
                ClientError::Refused(format!("HTTP {status}"))
            });
        }
        let mut events = resp.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event =
                event.map_err(|e| ClientError::Unavailable(format!("the stream broke: {e}")))?;
            if let Ok(value) = serde_json::from_str::<Value>(&event.data) {
                each(&value);
            }
        }
        Ok(())
    }
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
