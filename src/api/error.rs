//! The one mapping from failures to HTTP responses.
//!
//! Every error body has the same shape, `{"error": {"code": "...", "message": "..."}}`,
//! including bad JSON, unknown routes and wrong methods. Client mistakes say precisely
//! what is wrong; internal failures are logged and answered with a generic message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::views::{ErrorBody, ErrorDetail};

use crate::inventory::EditError;
use crate::model::InvalidInput;
use crate::rentals::{ReleaseError, RentError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the JSON we expect.
    #[error("{0}")]
    BadRequest(String),
    /// A field is well-formed JSON but not an acceptable value.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// A state-changing request whose body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many requests without a valid token from one client address; the wait
    /// until the next one is accepted.
    #[error(
        "too many requests without a valid token from this address; try again in {} s",
        retry_after_secs(*.0)
    )]
    RateLimited(std::time::Duration),
    /// A tenant's reads from workers (instances' logs) are over their bounds
    /// (`[apps.log_reads]`); the wait until the next may start.
    #[error(
        "too many log reads by this tenant (or by all at once); try again in {} s",
        retry_after_secs(*.0)
    )]
    TooManyReads(std::time::Duration),
    #[error("{0}")]
    Unauthorized(String),
    /// 401 for a page a browser opens: asks for Basic credentials, so the browser
    /// prompts (any user name, the token as the password).
    #[error("{0}")]
    LoginRequired(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    /// Nothing free matches what the rent asked for (`wanted`: its constraints in
    /// words, `field`: the one named in the error).
    #[error("no alive, free worker{} is available; try again later", .wanted.as_ref().map(|w| format!(" {w}")).unwrap_or_default())]
    NoFreeWorker {
        wanted: Option<String>,
        field: Option<&'static str>,
    },
    /// The tenant holds as many live rentals as it may.
    #[error("{0}")]
    QuotaExceeded(String),
    /// A worker failed to provision the account.
    #[error("{0}")]
    Provisioning(String),
    /// The database is down or overloaded.
    #[error("the service is temporarily unavailable; try again later")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Unexpected(#[source] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::RateLimited(_) | ApiError::TooManyReads(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            }
            ApiError::Unauthorized(_) | ApiError::LoginRequired(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::NoFreeWorker { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_free_worker"),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::Provisioning(_) => (StatusCode::BAD_GATEWAY, "provisioning_failed"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Unexpected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ApiError {
    /// A body that could not be read: too large (413) or cut off (400).
    pub fn from_body_rejection(rejection: &axum::extract::rejection::BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(super::BODY_LIMIT)
        } else {
            ApiError::BadRequest(format!(
                "cannot read the request body: {}",
                rejection.body_text()
            ))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Unexpected(e) => tracing::error!(error = format!("{e:#}"), "request failed"),
            ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "request refused: store unavailable")
            }
            _ => {}
        }
        let error = ErrorDetail {
            code: code.to_owned(),
            message: self.to_string(),
            field: match &self {
                ApiError::Invalid(invalid) => Some(invalid.field.to_owned()),
                ApiError::NoFreeWorker { field, .. } => field.map(str::to_owned),
                _ => None,
            },
        };
        let mut response = (status, Json(ErrorBody { error })).into_response();
        if let ApiError::RateLimited(wait) | ApiError::TooManyReads(wait) = &self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after_secs(*wait)),
            );
        }
        let challenge = match self {
            ApiError::LoginRequired(_) => Some(r#"Basic realm="Orion", charset="UTF-8""#),
            ApiError::Unauthorized(_) => Some("Bearer"),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// Whole seconds to wait, rounded up: `Retry-After` has no fractions, and 0 would invite
/// an immediate retry that is refused again.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Fenced { .. } => ApiError::Unavailable(e),
            StoreError::InstanceQuota { .. } => ApiError::QuotaExceeded(e.to_string()),
            StoreError::UsernameTaken(_)
            | StoreError::NameTaken(_)
            | StoreError::TenantLookalike(_) => ApiError::Conflict(e.to_string()),
            StoreError::Inventory(EditError::Invalid(invalid)) => ApiError::Invalid(invalid),
            StoreError::Inventory(e @ EditError::Exists(_)) => ApiError::Conflict(e.to_string()),
            StoreError::Inventory(e @ EditError::Missing(_)) => ApiError::NotFound(e.to_string()),
            other => ApiError::Unexpected(other.into()),
        }
    }
}

impl From<RentError> for ApiError {
    fn from(e: RentError) -> Self {
        match e {
            RentError::NoFreeWorker { wanted } => ApiError::NoFreeWorker {
                field: wanted.field(),
                wanted: wanted.describe(),
            },
            RentError::QuotaExceeded(limit) => ApiError::QuotaExceeded(format!(
                "this tenant already holds {limit} live rentals, its limit; release one first"
            )),
            RentError::UsernameTaken(e) => ApiError::Conflict(e.to_string()),
            e @ RentError::NameTakenOnWorker { .. } => ApiError::Conflict(e.to_string()),
            RentError::Provisioning { worker, .. } => ApiError::Provisioning(format!(
                "the account could not be created on worker {worker}; nothing was kept, try again"
            )),
            RentError::Store(e) => e.into(),
        }
    }
}

impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::NotFound => ApiError::NotFound("no such rental".into()),
            ReleaseError::NotReleasable(_) => ApiError::Conflict(e.to_string()),
            ReleaseError::Store(e) => e.into(),
        }
    }
}
