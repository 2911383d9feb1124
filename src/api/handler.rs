//! What every handler of the API uses, whatever its resource: the record of a route
//! ([`Endpoint`]) each resource lists its routes in, the reading of a JSON body, and the
//! admin check. Kept below the resources' files so that none of them imports the module
//! that merges them.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};
use serde::Deserialize;

use super::error::ApiError;
use crate::auth::Caller;
use crate::context::Context;

/// Refuses a tenant's token (403) where only the admin may act.
pub(super) fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Tenant(_) => Err(ApiError::Forbidden("this needs the admin token".into())),
    }
}

/// Parses a JSON body; an empty body is an empty object (all fields optional).
pub(super) fn parse_json<T: for<'de> Deserialize<'de> + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// One route: its method and path, and what answers it.
pub(super) struct Endpoint {
    pub(super) method: Method,
    pub(super) path: &'static str,
    pub(super) handler: MethodRouter<Context>,
}

pub(super) fn endpoint<H, T>(method: Method, path: &'static str, handler: H) -> Endpoint
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
