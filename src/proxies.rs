//! Which peers may speak for a client's address: the proxies whose `X-Forwarded-For`
//! Orion believes (`[http]`), by network and by host name.

use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use crate::clock::Clock;

/// The proxies whose `X-Forwarded-For` is believed: `http.trusted_proxies`, and the
/// addresses `http.trusted_proxy_hosts` resolve to. Names are looked up again every
/// [`RESOLVE_EVERY`]; and after [`RESOLVE_AGAIN_AFTER`] while one of them did not
/// resolve (the proxy starts after Orion), or when a peer that is not trusted comes (a
/// restarted proxy container has a new address): at most one lookup a second for those.
/// A name that does not resolve keeps the addresses it last had.
#[derive(Debug)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    resolved: tokio::sync::Mutex<Resolved>,
}

#[derive(Debug, Default)]
struct Resolved {
    /// When the names were last looked up, and whether every one resolved.
    at: Option<(Instant, bool)>,
    addrs: Vec<IpNet>,
}

/// How long resolved proxy addresses are used before they are looked up again.
const RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How soon a peer that is not trusted makes the names be looked up again.
const RESOLVE_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl TrustedProxies {
    pub fn new(http: &crate::config::HttpConfig) -> Self {
        Self {
            nets: http.trusted_proxies.clone(),
            hosts: http.trusted_proxy_hosts.clone(),
            resolved: tokio::sync::Mutex::default(),
        }
    }

    /// Every trusted network and address now (on `clock`), as `peer` would find them.
    pub async fn current(&self, peer: Option<IpAddr>, clock: &Clock) -> Vec<IpNet> {
        let trusts = |nets: &[IpNet], ip: &IpAddr| nets.iter().any(|n| n.contains(ip));
        if self.hosts.is_empty() {
            return self.nets.clone();
        }
        let mut resolved = self.resolved.lock().await;
        let peer = peer.map(|p| p.to_canonical());
        let stranger =
            peer.is_some_and(|p| !trusts(&self.nets, &p) && !trusts(&resolved.addrs, &p));
        let elapsed = |at: Instant| clock.now().saturating_duration_since(at);
        let due = match resolved.at {
            None => true,
            Some((at, false)) => elapsed(at) >= RESOLVE_AGAIN_AFTER,
            Some((at, true)) => {
                elapsed(at) >= RESOLVE_EVERY || (stranger && elapsed(at) >= RESOLVE_AGAIN_AFTER)
            }
        };
        if due {
            let mut found = Vec::new();
            let mut all = true;
            for host in &self.hosts {
                match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(addrs) => found.extend(addrs.map(|a| IpNet::from(a.ip().to_canonical()))),
                    Err(e) => {
                        all = false;
                        tracing::debug!(proxy = %host, error = %e,
                            "cannot resolve a trusted proxy's name; keeping what it had");
                    }
                }
            }
            if !all {
                found.extend(resolved.addrs.iter().copied());
            }
            found.sort();
            found.dedup();
            *resolved = Resolved {
                at: Some((clock.now(), all)),
                addrs: found,
            };
        }
        self.nets.iter().chain(&resolved.addrs).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::guard::client_address;
    use axum::http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn a_trusted_proxy_is_named_and_no_other_peer_of_its_network_is_trusted() {
        let http = crate::config::HttpConfig {
            trusted_proxies: nets(&["192.0.2.7/32"]),
            trusted_proxy_hosts: vec!["localhost".into()],
            ..Default::default()
        };
        let proxies = TrustedProxies::new(&http);
        let stranger: IpAddr = "127.0.0.2".parse().unwrap();
        let trusted = proxies.current(Some(stranger), &Clock::default()).await;
        let has = |ip: &str| {
            trusted
                .iter()
                .any(|n| n.contains(&ip.parse::<IpAddr>().unwrap()))
        };
        assert!(has("192.0.2.7"), "{trusted:?}");
        assert!(
            has("127.0.0.1"),
            "localhost resolves to loopback: {trusted:?}"
        );
        assert!(
            !has("127.0.0.2"),
            "only the name's address, not its network"
        );
        // A peer from the proxy's network, with a forged X-Forwarded-For, is itself the client.
        let forged = [HeaderValue::from_static("203.0.113.9")];
        assert_eq!(
            client_address(Some(stranger), forged.iter(), &trusted),
            stranger
        );
        assert_eq!(
            client_address(Some("127.0.0.1".parse().unwrap()), forged.iter(), &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_trusts_nothing_more() {
        let http = crate::config::HttpConfig {
            trusted_proxies: Vec::new(),
            trusted_proxy_hosts: vec!["no-such-proxy.invalid".into()],
            ..Default::default()
        };
        let trusted = TrustedProxies::new(&http)
            .current(None, &Clock::default())
            .await;
        assert!(trusted.is_empty(), "{trusted:?}");
    }
}
