//! Notifying a rental's `notify_url` after it moved, without letting a tenant aim Orion at
//! the networks behind it.
//!
//! A `notify_url` is chosen by the tenant, and Orion sits on the control-plane network
//! next to its database, Caddy's admin API and the workers' SSH ports. So a notification
//! goes only to public addresses (or to networks the operator allows in
//! `migration.notify_allow`): checked when the rent is made (a clear 422), and again when
//! the name is resolved for each delivery (a name may point elsewhere by then). Redirects
//! are never followed: a public receiver cannot bounce Orion to a private one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::json;

use crate::model::{InvalidInput, NotifyUrl};
use crate::store::Store;

/// Bound on resolving a `notify_url`'s host at rent time.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Which addresses a notification may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Arc<Vec<IpNet>>,
}

impl AddressPolicy {
    /// Public addresses, plus the non-public networks in `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self {
            allow: Arc::new(allow),
        }
    }

    /// Whether a notification may be sent to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_public(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Checks a URL's host now: an address literal, or every address its name resolves
    /// to, must be permitted.
    pub async fn check(&self, url: &NotifyUrl) -> Result<(), InvalidInput> {
        let bad = |m: String| Err(InvalidInput::new("notify_url", m));
        let parsed = url::Url::parse(url.as_str())
            .map_err(|e| InvalidInput::new("notify_url", format!("is not an absolute URL: {e}")))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<IpAddr> = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            Some(url::Host::Domain(name)) => {
                match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
                    .await
                {
                    Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                    Ok(Err(_)) | Err(_) => return bad(format!("host `{name}` does not resolve")),
                }
            }
            None => return bad("must name a host".into()),
        };
        if addrs.is_empty() {
            return bad("host resolves to no address".into());
        }
        match addrs.iter().find(|ip| !self.permits(**ip)) {
            Some(ip) => bad(format!(
                "reaches {ip}, a loopback, link-local or private address; notifications go \
                 to public addresses only (an operator can allow a network with \
                 migration.notify_allow)"
            )),
            None => Ok(()),
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Globally routable unicast: not loopback, private, link-local, shared (CGNAT),
/// unspecified, broadcast, multicast, documentation or reserved.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (18..20).contains(&b)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || first == 0x2001 && v6.segments()[1] == 0xdb8
                || first == 0x0064 && v6.segments()[1] == 0xff9b
                || v6.segments()[..6] == [0; 6])
        }
    }
}

/// Resolves names for the notification client, keeping only permitted addresses: a name
/// that points at a private address by delivery time gets nothing.
struct PolicyResolver(AddressPolicy);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let permitted: Vec<SocketAddr> = found.filter(|a| policy.permits(a.ip())).collect();
            if permitted.is_empty() {
                return Err(format!(
                    "`{}` resolves to no address a notification may reach",
                    name.as_str()
                )
                .into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client for notifications: no redirects, names resolved through the policy.
pub fn client(policy: &AddressPolicy) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("orion/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(PolicyResolver(policy.clone())))
        .build()
}

/// Sends notifications: the policy, the client that keeps to it, and how hard to try.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Which addresses a `notify_url` may reach.
    policy: AddressPolicy,
    /// No redirects, names resolved through `policy`.
    http: reqwest::Client,
    /// Tries per notification (`migration.notify_attempts`).
    attempts: u32,
    /// Bound on one try (`migration.notify_timeout`).
    timeout: Duration,
}

impl Notifier {
    pub fn new(policy: AddressPolicy, attempts: u32, timeout: Duration) -> reqwest::Result<Self> {
        Ok(Self {
            http: client(&policy)?,
            policy,
            attempts,
            timeout,
        })
    }

    /// Checks a `notify_url` at rent time ([`AddressPolicy::check`]).
    pub async fn check(&self, url: &NotifyUrl) -> Result<(), InvalidInput> {
        self.policy.check(url).await
    }

    /// POSTs the rental's new placement to its `notify_url`, retrying with back-off; runs
    /// in its own task and records the outcome as an event. A redirect is an answer, not
    /// a success: it is not followed.
    pub async fn deliver(self, store: Store, rental_id: String, url: String, gateway_host: String) {
        let Ok(Some(detail)) = store.rental_detail(&rental_id).await else {
            return;
        };
        let view = crate::api::views::RentalView::new(detail, &gateway_host);
        let body = json!({ "event": "rental.migrated", "rental": view });
        let mut last_error = String::new();
        // The resolver guards names at each try; an address literal is checked once here.
        let literal = NotifyUrl::parse(&url)
            .map_err(|e| e.to_string())
            .and_then(|valid| literal_check(&self.policy, &valid));
        let attempts = if let Err(e) = literal {
            last_error = e;
            0
        } else {
            self.attempts
        };
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1).min(6))).await;
            }
            match self
                .http
                .post(&url)
                .timeout(self.timeout)
                .json(&body)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => {
                    let _ = store
                        .append_event(
                            "rental.notified",
                            None,
                            Some(&rental_id),
                            &format!("POST {url}"),
                        )
                        .await;
                    return;
                }
                Ok(resp) if resp.status().is_redirection() => {
                    last_error = format!("answered {} (redirects are not followed)", resp.status());
                    break;
                }
                Ok(resp) => last_error = format!("answered {}", resp.status()),
                Err(e) => last_error = format!("{:#}", anyhow::Error::new(e.without_url())),
            }
        }
        tracing::warn!(rental_id, error = %last_error, "notification not delivered");
        let _ = store
            .append_event(
                "rental.notify_failed",
                None,
                Some(&rental_id),
                &format!("POST {url}: {last_error}"),
            )
            .await;
    }
}

/// A URL whose host is an address literal must name a permitted address.
fn literal_check(policy: &AddressPolicy, url: &NotifyUrl) -> Result<(), String> {
    let parsed = url::Url::parse(url.as_str()).map_err(|e| e.to_string())?;
    let ip = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    if policy.permits(ip) {
        Ok(())
    } else {
        Err(format!("{ip} is not an address a notification may reach"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_addresses_are_permitted_by_default() {
        let p = AddressPolicy::default();
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!p.permits(ip(private)), "{private} must be refused");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "172.32.0.1"] {
            assert!(p.permits(ip(public)), "{public} must be permitted");
        }
    }

    #[test]
    fn an_allowed_network_is_permitted_and_nothing_else() {
        let p = AddressPolicy::new(vec!["10.20.0.0/16".parse().unwrap()]);
        assert!(p.permits(ip("10.20.3.4")));
        assert!(p.permits(ip("::ffff:10.20.3.4")));
        assert!(!p.permits(ip("10.21.0.1")));
        assert!(!p.permits(ip("127.0.0.1")));
    }

    #[tokio::test]
    async fn a_url_to_a_private_address_is_refused_with_a_reason() {
        let p = AddressPolicy::default();
        for url in [
            "http://127.0.0.1:9/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://localhost:8080/",
            "http://10.0.0.1/",
        ] {
            let err = p.check(&NotifyUrl::parse(url).unwrap()).await.unwrap_err();
            assert_eq!(err.field, "notify_url");
            assert!(
                err.message.contains("private") || err.message.contains("resolve"),
                "{url}: {}",
                err.message
            );
        }
        p.check(&NotifyUrl::parse("https://1.1.1.1/hook").unwrap())
            .await
            .unwrap();
    }
}
