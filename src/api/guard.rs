//! What every request goes through before a handler sees it, in one middleware
//! ([`guard`]): the body must be JSON, the caller is authenticated once, and requests
//! that prove nothing are rate limited per client address.
//!
//! **Cross-site requests.** A page on another site can make a browser send a form
//! (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`) or a
//! body-less `fetch` to Orion, and the browser adds the Basic credentials it cached for
//! the dashboard by itself; it cannot add an `Authorization: Bearer` header, nor send
//! `Content-Type: application/json`, without asking Orion first (CORS preflight), which
//! Orion never grants. So:
//!
//! - a state-changing request (any method but GET, HEAD, OPTIONS, TRACE) with a body
//!   must say `Content-Type: application/json`, else 415; one without a body and without
//!   a `Content-Type` (`DELETE`, `POST …/drain`) is fine;
//! - Basic credentials are accepted for reading only (the dashboard's GETs); a
//!   state-changing request needs a Bearer token, else 401.
//!
//! **Client address** ([`client_address`]): the TCP peer, or, when the peer is a
//! trusted proxy (`http.trusted_proxies`), the right-most untrusted address of
//! `X-Forwarded-For`.
//!
//! **Rate limit** ([`crate::ratelimit`]): the admin token is compared by hash and never
//! limited; every other request takes a turn from its address's bucket *before* its
//! token is looked up (429 with `Retry-After` when none is left), and gets it back when
//! the token is good.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use super::error::ApiError;
use crate::auth::{self, Caller};
use crate::context::Context;

/// Checks the body's type, works out the client address, authenticates and rate limits;
/// the outcome of authentication is left for the [`Caller`] extractor.
pub(super) async fn guard(State(ctx): State<Context>, mut req: Request, next: Next) -> Response {
    if let Err(refused) = body_is_json_or_absent(req.method(), req.headers()) {
        return refused.into_response();
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let trusted = ctx.proxies.current(peer, &ctx.clock).await;
    if ctx.config.http.proxied_only
        && let Some(peer) = peer
        && !trusted.iter().any(|net| net.contains(&peer.to_canonical()))
    {
        return ApiError::Forbidden("Orion's API is reached through its proxy only".into())
            .into_response();
    }
    let client = client_address(
        peer,
        req.headers().get_all("x-forwarded-for").iter(),
        &trusted,
    );
    let outcome = match authenticate(&ctx, req.method(), req.headers(), client).await {
        Err(ApiError::RateLimited(wait)) => {
            metrics::counter!(crate::metrics::names::RATE_LIMITED).increment(1);
            return ApiError::RateLimited(wait).into_response();
        }
        outcome => outcome,
    };
    req.extensions_mut()
        .insert(Authentication(Arc::new(Mutex::new(Some(outcome)))));
    next.run(req).await
}

/// Who the guard found the caller to be, or why not; taken by the [`Caller`] extractor.
/// (Extensions must be `Clone`, and an [`ApiError`] is not.)
#[derive(Clone)]
struct Authentication(Arc<Mutex<Option<Result<Caller, ApiError>>>>);

impl FromRequestParts<Context> for Caller {
    type Rejection = ApiError;

    /// The caller the [`guard`] authenticated: the admin token (compared by hash) or a
    /// live tenant token, as a Bearer token or (to read) a Basic password; else 401.
    async fn from_request_parts(parts: &mut Parts, _: &Context) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Authentication>()
            .and_then(|a| a.0.lock().expect("authentication poisoned").take())
            .unwrap_or_else(|| {
                Err(ApiError::Unexpected(anyhow::anyhow!(
                    "the caller was not authenticated by the guard"
                )))
            })
    }
}

async fn authenticate(
    ctx: &Context,
    method: &Method,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<Caller, ApiError> {
    let presented = headers.get(AUTHORIZATION).map(|value| {
        let value = value.to_str().ok();
        let token = value.and_then(auth::presented_token);
        let basic = value.is_some_and(|v| auth::bearer(v).is_none());
        (token, basic)
    });
    // A browser adds cached Basic credentials to cross-site requests too.
    let basic_for_a_change = matches!(presented, Some((Some(_), true))) && !method.is_safe();
    let hash = presented
        .as_ref()
        .and_then(|(token, _)| token.as_deref())
        .map(auth::token_hash);
    if hash.as_deref() == Some(ctx.admin_token_hash.as_str()) && !basic_for_a_change {
        return Ok(Caller::Admin);
    }
    ctx.limiter
        .take(client, ctx.clock.now())
        .map_err(ApiError::RateLimited)?;
    if presented.is_none() {
        return Err(ApiError::Unauthorized(
            "missing `Authorization: Bearer <token>`".into(),
        ));
    }
    let Some(hash) = hash else {
        return Err(ApiError::Unauthorized(
            "expected `Authorization: Bearer <token>` (or, to read, Basic with the token as \
             the password)"
                .into(),
        ));
    };
    if basic_for_a_change {
        return Err(ApiError::Unauthorized(
            "Basic credentials are accepted only to read; send `Authorization: Bearer <token>`"
                .into(),
        ));
    }
    match ctx.store.tenant_of_token(&hash).await? {
        Some(tenant) => {
            ctx.limiter.refund(client);
            Ok(Caller::Tenant(tenant))
        }
        None => Err(ApiError::Unauthorized("unknown or revoked token".into())),
    }
}

/// A state-changing request carries JSON or nothing at all.
fn body_is_json_or_absent(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if method.is_safe() {
        return Ok(());
    }
    let refused = || {
        ApiError::UnsupportedMediaType(
            "the request body must be JSON, sent with `Content-Type: application/json`".into(),
        )
    };
    match headers.get(CONTENT_TYPE) {
        Some(value) if is_json(value) => Ok(()),
        Some(_) => Err(refused()),
        None if has_body(headers) => Err(refused()),
        None => Ok(()),
    }
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &HeaderValue) -> bool {
    content_type.to_str().is_ok_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// Whether the request says a body follows: a non-zero `Content-Length`, or chunks.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map_or(true, |n| n.trim() != "0"))
}

/// The address a request comes from: `peer`, unless `peer` is a trusted proxy; then the
/// right-most address of `X-Forwarded-For` (over all its headers, in order) that is not
/// trusted, or the left-most one if all are. An entry that is not an address ends the
/// walk: what is left of it cannot be trusted, so the last good one is taken. No peer
/// (a router driven without a listener) reads as the unspecified address.
pub fn client_address<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let Some(mut client) = peer.map(|ip| ip.to_canonical()) else {
        return IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    };
    let mut entries = forwarded_for.rev().flat_map(|value| {
        value
            .to_str()
            .unwrap_or("!")
            .rsplit(',')
            .collect::<Vec<_>>()
    });
    while is_trusted(&client) {
        let Some(next) = entries.next().and_then(parse_forwarded) else {
            break;
        };
        client = next;
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn client(peer: &str, xff: &[&str], trusted: &[&str]) -> String {
        let values: Vec<HeaderValue> = xff
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        client_address(Some(peer.parse().unwrap()), values.iter(), &nets(trusted)).to_string()
    }

    const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128"];
    const COMPOSE: &[&str] = &["127.0.0.0/8", "172.16.0.0/12"];

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(
            client("198.51.100.7", &["10.9.9.9"], LOOPBACK),
            "198.51.100.7"
        );
        assert_eq!(client("198.51.100.7", &[], LOOPBACK), "198.51.100.7");
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_untrusted_address_is_the_client() {
        // Caddy (172.18.0.3) appends the address it saw; the client forged the left one.
        assert_eq!(
            client("172.18.0.3", &["6.6.6.6, 203.0.113.5"], COMPOSE),
            "203.0.113.5"
        );
        // Several headers count as one list, in order; trusted hops are skipped.
        assert_eq!(
            client(
                "172.18.0.3",
                &["6.6.6.6", "203.0.113.5, 127.0.0.1"],
                COMPOSE
            ),
            "203.0.113.5"
        );
        assert_eq!(
            client("::ffff:172.18.0.3", &["[2001:db8::1]:4711"], COMPOSE),
            "2001:db8::1"
        );
    }

    #[test]
    fn a_trusted_peer_without_forwarding_is_the_client() {
        // Caddy's own health checks, `orion healthcheck`, tests on loopback.
        assert_eq!(client("127.0.0.1", &[], LOOPBACK), "127.0.0.1");
        assert_eq!(client("127.0.0.1", &["127.0.0.2"], LOOPBACK), "127.0.0.2");
    }

    #[test]
    fn garbage_in_the_header_ends_the_walk_at_the_last_trusted_hop() {
        assert_eq!(client("127.0.0.1", &["nonsense"], LOOPBACK), "127.0.0.1");
        assert_eq!(
            client("127.0.0.1", &["6.6.6.6, nonsense, 127.0.0.5"], LOOPBACK),
            "127.0.0.5"
        );
    }

    #[test]
    fn a_router_without_a_listener_has_no_peer() {
        let none: Vec<HeaderValue> = Vec::new();
        assert!(client_address(None, none.iter(), &nets(LOOPBACK)).is_unspecified());
    }

    fn headers(list: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in list {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_change_carries_json_or_nothing() {
        let ok = |m: Method, h: &[(&'static str, &str)]| body_is_json_or_absent(&m, &headers(h));
        assert!(ok(Method::POST, &[("content-type", "application/json")]).is_ok());
        assert!(
            ok(
                Method::POST,
                &[("content-type", "Application/JSON; charset=utf-8")]
            )
            .is_ok()
        );
        assert!(ok(Method::DELETE, &[]).is_ok());
        assert!(ok(Method::POST, &[("content-length", "0")]).is_ok());
        for refused in [
            vec![("content-type", "text/plain")],
            vec![("content-type", "application/x-www-form-urlencoded")],
            vec![("content-type", "multipart/form-data; boundary=x")],
            vec![("content-type", "application/jsonp")],
            vec![("content-type", "text/plain"), ("content-length", "0")],
            vec![("content-length", "12")],
            vec![("transfer-encoding", "chunked")],
        ] {
            for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
                let err = ok(method.clone(), &refused).unwrap_err();
                assert!(
                    matches!(err, ApiError::UnsupportedMediaType(_)),
                    "{method} {refused:?}"
                );
            }
        }
        // Reading changes nothing: whatever it sends is ignored.
        assert!(ok(Method::GET, &[("content-type", "text/plain")]).is_ok());
    }
}
