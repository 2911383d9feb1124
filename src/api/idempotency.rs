//! `Idempotency-Key` on `POST /api/rent` and `POST /api/apps`: a client that sends the
//! same request again with the same key — after a timeout, a dropped connection, or a
//! replica that died mid-request — gets the rental or app the first request made, never
//! a second one. The answer to a replay is the resource as it is now (status 201, header
//! `Idempotent-Replayed: true`); a generated password is shown only by the request that
//! made it, since it is never stored.
//!
//! A key is the tenant's own (two tenants may use the same key), lives a day, and stands
//! for one request: the same key with another body is refused (422). While the first
//! request runs, a retry gets 409 and tries again later; if that request was cut short
//! and made nothing that lives, a retry runs it again — as soon as its process has
//! stopped saying it is alive (`leader.lease` × 2 of silence in the `replicas` table), or
//! after the request's deadline. What the cut-short request left half-made is ended
//! first, so that it can never come to life beside the retry's.

use std::future::Future;
use std::time::Duration;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::context::Context;
use crate::model::InvalidInput;
use crate::store::{KeyClaim, KeyHold};

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header of a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// How long a key is kept.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);

/// A request's key, with what identifies the request.
#[derive(Debug, Clone)]
pub struct Keyed {
    tenant: String,
    route: &'static str,
    key: String,
    hash: String,
}

/// What a keyed request does.
pub enum Begin {
    /// Run it: the key now stands for it.
    Run,
    /// Answer with this resource (a rental's id, an app's name): the key's request made it.
    Replay(String),
}

/// The request's `Idempotency-Key`, if it has one: 1 to 255 visible ASCII characters.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::Invalid(InvalidInput::new(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        ))
    };
    let key = value.to_str().map_err(|_| invalid())?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid());
    }
    Ok(Some(key.to_owned()))
}

/// SHA-256 of the request's JSON with its keys sorted: the same request however its
/// fields are ordered or spaced. An empty body is `{}`.
pub fn request_hash(body: &[u8]) -> String {
    let value: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
    };
    // serde_json's maps are sorted by key (no `preserve_order`): one text per request.
    let canonical = serde_json::to_string(&value).expect("a JSON value prints");
    format!("{:x}", Sha256::digest(canonical.as_bytes()))
}

impl Keyed {
    /// The key as this process holds it while running the request.
    pub fn hold(&self, ctx: &Context) -> KeyHold {
        KeyHold {
            tenant: self.tenant.clone(),
            route: self.route,
            key: self.key.clone(),
            holder: ctx.leader.holder().to_owned(),
        }
    }

    pub fn new(tenant: &str, route: &'static str, key: String, body: &[u8]) -> Self {
        Self {
            tenant: tenant.to_owned(),
            route,
            key,
            hash: request_hash(body),
        }
    }

    /// Claims the key for a request that will make `resource`. `lives` says whether a
    /// resource a cut-short request left is alive (then the key stands for it);
    /// `abandon` ends what such a request left half-made, so that it never comes to life
    /// beside the retry's (false if it came to life meanwhile); `deadline` is how long the
    /// request can run. A request is cut short when its process has stopped saying it is
    /// alive, or when its deadline has passed.
    pub async fn begin<L, LF, A, AF>(
        &self,
        ctx: &Context,
        resource: &str,
        deadline: Duration,
        lives: L,
        abandon: A,
    ) -> Result<Begin, ApiError>
    where
        L: Fn(String) -> LF,
        LF: Future<Output = Result<bool, ApiError>>,
        A: FnOnce(String) -> AF,
        AF: Future<Output = Result<bool, ApiError>>,
    {
        let store = &ctx.store;
        let (tenant, route, key) = (&self.tenant, self.route, &self.key);
        let holder = ctx.leader.holder();
        let silent = ctx.config.leader.lease * 2;
        let claim = store
            .claim_idempotency_key(tenant, route, key, &self.hash, resource, holder, silent)
            .await?;
        match claim {
            KeyClaim::New => Ok(Begin::Run),
            KeyClaim::Done { resource_id } => Ok(Begin::Replay(resource_id)),
            KeyClaim::Mismatch => Err(ApiError::Invalid(InvalidInput::new(
                "Idempotency-Key",
                "was already used with a different request",
            ))),
            KeyClaim::Running {
                resource_id,
                for_,
                orphaned,
            } => {
                let replay = |resource_id: String| async move {
                    // It did finish, but its process died before saying so.
                    store
                        .finish_idempotency_key(tenant, route, key, &resource_id, &resource_id)
                        .await?;
                    Ok(Begin::Replay(resource_id))
                };
                if lives(resource_id.clone()).await? {
                    return replay(resource_id).await;
                }
                if for_ < deadline && !orphaned {
                    return Err(ApiError::Conflict(
                        "a request with this Idempotency-Key is still running; try again later"
                            .into(),
                    ));
                }
                // Cut short, and it made nothing that lives: what it left is ended, then
                // it runs again.
                if !abandon(resource_id.clone()).await? && lives(resource_id.clone()).await? {
                    return replay(resource_id).await;
                }
                if store
                    .retake_idempotency_key(tenant, route, key, &resource_id, resource, holder)
                    .await?
                {
                    Ok(Begin::Run)
                } else {
                    Err(ApiError::Conflict(
                        "another request with this Idempotency-Key just started; try again later"
                            .into(),
                    ))
                }
            }
        }
    }

    /// Records how the request that began for `began` ended: kept, standing for `made`
    /// (the rental's final id, the app's name), if it made one; forgotten (a retry runs
    /// again) if it failed (`None`). Neither if a retry took the key over meanwhile.
    pub async fn end(&self, ctx: &Context, began: &str, made: Option<&str>) {
        let store = &ctx.store;
        let (tenant, route, key) = (&self.tenant, self.route, &self.key);
        let recorded = match made {
            Some(resource) => {
                store
                    .finish_idempotency_key(tenant, route, key, began, resource)
                    .await
            }
            None => {
                store
                    .forget_idempotency_key(tenant, route, key, began)
                    .await
            }
        };
        if let Err(e) = recorded {
            // A key left running is retaken once its process is gone or its deadline passes.
            tracing::warn!(error = %e, "cannot record the end of an idempotent request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_request_hashes_alike_however_it_is_written() {
        let a = request_hash(br#"{"username": "ann", "ttl": "2h"}"#);
        let b = request_hash(b"{\"ttl\":\"2h\",\n \"username\":\"ann\"}");
        assert_eq!(a, b);
        assert_ne!(a, request_hash(br#"{"username": "bob", "ttl": "2h"}"#));
        assert_eq!(request_hash(b""), request_hash(b"{}"));
    }

    #[test]
    fn a_key_is_visible_ascii_of_at_most_255_characters() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(HEADER, v.parse().unwrap());
            h
        };
        assert_eq!(key_of(&HeaderMap::new()).unwrap(), None);
        assert_eq!(key_of(&headers("k-1")).unwrap().as_deref(), Some("k-1"));
        assert!(key_of(&headers("")).is_err());
        assert!(key_of(&headers("a b")).is_err());
        assert!(key_of(&headers(&"k".repeat(256))).is_err());
    }
}
