//! The SSH gateway: a stable address per rental. Each live rental is given one port of
//! `gateway.ports` for its whole life; a connection to that port is forwarded, byte for
//! byte, to the SSH server of the worker serving the rental now — after a move, the new
//! one. SSH runs end to end between the tenant's client and the worker: the gateway
//! holds no tenant secret and sees only ciphertext.
//!
//! A connection that arrives while its rental is moving waits (up to `gateway.wait`) for
//! the move to finish rather than being refused, so a client that reconnects at once
//! after its worker died lands on the new worker. Every control-plane replica forwards
//! every port, from its own copy of the ports' rentals ([`Routes`]).
//!
//! Anyone can reach the ports, so a connection is bounded before it costs anything: at
//! most `gateway.max_per_source` open at once from one address; one that sends nothing
//! within `gateway.first_bytes_timeout` is closed before any lookup or connection to a
//! worker (an SSH client sends its banner first); the port's rental is read from memory,
//! not from the database; and at most `gateway.max_waiting` connections (and
//! `max_waiting_per_port` on one port) wait through a move, the others being closed at
//! once.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::model::RentalStatus;
use crate::store::{EndpointTarget, Store, StoreError};

/// How often a waiting connection looks again at its rental; also the shortest time
/// between two reads of the ports' rentals, however many connections ask.
const WAIT_STEP: Duration = Duration::from_millis(100);

/// Connections the gateway holds at once, forwarded or waiting, all ports together:
/// beyond, a new connection is closed at once (a bound on file descriptors).
pub const MAX_CONNECTIONS: usize = 4096;

/// TCP keepalive on both sides of a forwarded connection: a worker that vanished (power
/// cut, network cut) or a client that did is noticed within about 25 s, and the
/// connection and its task end instead of hanging.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// The gateway's listeners, bound at start (a port already taken fails the start, not
/// a rent).
pub struct Gateway {
    listeners: Vec<(u16, TcpListener)>,
}

/// Where connections go, and the bounds on what they cost. Cheap to clone.
#[derive(Clone)]
pub struct Forwarding {
    /// Bound on reaching the worker's SSH server.
    connect_timeout: Duration,
    /// `[gateway]`: the wait through a move and the bounds on connections.
    config: Arc<GatewayConfig>,
    /// The ports' rentals, from memory.
    routes: Arc<Routes>,
    /// Room for more connections ([`MAX_CONNECTIONS`]).
    slots: Arc<Semaphore>,
    /// Connections open per client address ([`source_key`]).
    sources: Arc<Tally<IpAddr>>,
    /// Connections waiting through a move, all ports together.
    waiting: Arc<Semaphore>,
    /// Connections waiting through a move, per port.
    waiting_on: Arc<Tally<u16>>,
}

impl Forwarding {
    pub fn new(store: Store, connect_timeout: Duration, config: &GatewayConfig) -> Self {
        Self {
            connect_timeout,
            routes: Arc::new(Routes {
                store,
                ttl: config.cache_ttl,
                table: tokio::sync::Mutex::default(),
            }),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            sources: Arc::default(),
            waiting: Arc::new(Semaphore::new(config.max_waiting)),
            waiting_on: Arc::default(),
            config: Arc::new(config.clone()),
        }
    }

    /// A turn to wait through a move on `port`, if both bounds have room.
    fn wait_turn(&self, port: u16) -> Option<(OwnedSemaphorePermit, Held<u16>)> {
        let all = self.waiting.clone().try_acquire_owned().ok()?;
        let here = self
            .waiting_on
            .take(port, self.config.max_waiting_per_port)?;
        Some((all, here))
    }
}

impl Gateway {
    /// Binds every port of `ports` on `address`.
    pub async fn bind(
        address: std::net::IpAddr,
        ports: RangeInclusive<u16>,
    ) -> anyhow::Result<Self> {
        let mut listeners = Vec::with_capacity(ports.len());
        for port in ports {
            let listener = TcpListener::bind((address, port))
                .await
                .with_context(|| format!("Failed to listen on gateway port {address}:{port}"))?;
            listeners.push((port, listener));
        }
        Ok(Self { listeners })
    }

    /// Accepts on every port until `shutdown`. Connections already forwarded are not
    /// waited for: a tenant's SSH session may last for days.
    pub async fn serve(self, forwarding: Forwarding, shutdown: CancellationToken) {
        let mut accepting = tokio::task::JoinSet::new();
        for (port, listener) in self.listeners {
            let (forwarding, shutdown) = (forwarding.clone(), shutdown.clone());
            accepting.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted,
                        () = shutdown.cancelled() => return,
                    };
                    match accepted {
                        Ok((client, peer)) => {
                            let Ok(slot) = forwarding.slots.clone().try_acquire_owned() else {
                                closed("busy");
                                tracing::warn!(port, %peer, "gateway full: connection closed");
                                continue;
                            };
                            let max = forwarding.config.max_per_source;
                            let Some(source) = forwarding.sources.take(source_key(peer.ip()), max)
                            else {
                                closed("source_limit");
                                tracing::debug!(port, %peer, "too many connections from this address: closed");
                                continue;
                            };
                            let forwarding = forwarding.clone();
                            tokio::spawn(async move {
                                forward(&forwarding, port, client, peer).await;
                                drop((slot, source));
                            });
                        }
                        Err(e) => {
                            // Out of file descriptors, most likely: don't spin.
                            tracing::warn!(port, error = %e, "gateway cannot accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        while accepting.join_next().await.is_some() {}
    }
}

/// Counts a connection closed without being forwarded, by why.
fn closed(outcome: &'static str) {
    metrics::counter!(crate::metrics::names::GATEWAY_CONNECTIONS, "outcome" => outcome)
        .increment(1);
}

/// What a per-address cap counts under: an IPv4 address, or the /64 of an IPv6 one (a
/// single machine or network is commonly given a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Forwards one client connection on `port` to its rental's worker, for as long as both
/// ends keep it open.
async fn forward(
    forwarding: &Forwarding,
    port: u16,
    mut client: TcpStream,
    peer: std::net::SocketAddr,
) {
    tune(&client);
    // An SSH client sends its banner at once: a silent one is closed before it costs a
    // lookup or a connection to a worker (whose sshd would hold it until its
    // LoginGraceTime). Peeked, not read: the bytes stay for the worker.
    let mut first = [0u8; 1];
    let silence = forwarding.config.first_bytes_timeout;
    match tokio::time::timeout(silence, client.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        // Gone before saying anything.
        Ok(_) => return,
        Err(_) => {
            closed("silent");
            tracing::debug!(port, %peer, "gateway connection closed: nothing sent within {silence:?}");
            return;
        }
    }
    let (rental_id, mut worker) = match reach(forwarding, port).await {
        Ok(reached) => reached,
        Err(outcome) => {
            closed(outcome);
            tracing::debug!(port, %peer, outcome, "gateway connection closed: no active rental reachable on this port");
            return;
        }
    };
    metrics::counter!(crate::metrics::names::GATEWAY_CONNECTIONS, "outcome" => "forwarded")
        .increment(1);
    tracing::debug!(port, %peer, rental_id, "gateway connection forwarded");
    tune(&worker);
    if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut client, &mut worker).await {
        metrics::counter!(crate::metrics::names::GATEWAY_BYTES).increment(up + down);
    }
}

/// No delay for interactive keystrokes; keepalives so that a vanished peer ends the
/// forwarding.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Connects to the worker serving the rental of `port`, waiting through a move. Fails
/// with the outcome to count: `refused` if the port has no live rental or none became
/// reachable in time, `wait_limit` if it would have to wait and the waits are full.
///
/// The first look takes the copy in memory as it is; a connection whose rental is not
/// there, not active or not answering looks again at copies read after it came (a rent
/// just made, a move), one every [`WAIT_STEP`], holding a turn to wait meanwhile.
async fn reach(forwarding: &Forwarding, port: u16) -> Result<(String, TcpStream), &'static str> {
    let arrived = Instant::now();
    let deadline = arrived + forwarding.config.wait;
    let mut since = None;
    let mut turn = None;
    loop {
        // Bounded as a whole: reads queue behind one another while the database fails.
        let route = tokio::time::timeout_at(deadline, forwarding.routes.route(port, since));
        let Ok(route) = route.await else {
            return Err("refused");
        };
        match route {
            Ok(Some(target)) => {
                if target.status == RentalStatus::Active
                    && let Some((host, ssh_port)) = &target.worker
                {
                    let connect = TcpStream::connect((host.as_str(), *ssh_port));
                    match tokio::time::timeout(forwarding.connect_timeout, connect).await {
                        Ok(Ok(stream)) => return Ok((target.rental_id, stream)),
                        Ok(Err(e)) => {
                            tracing::debug!(port, error = %e, "worker not reachable; waiting")
                        }
                        Err(_) => tracing::debug!(port, "worker not answering; waiting"),
                    }
                } else if !target.status.may_become_active() {
                    return Err("refused");
                }
            }
            // Not in a copy read after this connection came: no live rental.
            Ok(None) if since.is_some() => return Err("refused"),
            Ok(None) => {}
            // A database blip: keep the client waiting rather than drop it.
            Err(e) => tracing::warn!(port, error = %e, "gateway cannot read its rentals; retrying"),
        }
        if turn.is_none() {
            turn = Some(forwarding.wait_turn(port).ok_or("wait_limit")?);
        }
        if since.is_none() {
            since = Some(arrived);
            continue;
        }
        if Instant::now() + WAIT_STEP > deadline {
            return Err("refused");
        }
        since = Some(Instant::now());
        tokio::time::sleep(WAIT_STEP).await;
    }
}

/// The gateway's copy of the ports' rentals ([`Store::endpoint_targets`]), read whole
/// and kept in memory so that connections do not each read the database: at most one
/// read every `gateway.cache_ttl` while rentals are found active, and one every
/// [`WAIT_STEP`] at most however many connections ask for a fresher copy. One read at
/// a time; who needs a fresher copy meanwhile waits for it.
///
/// A copy rather than a notification from the migration loop: the loop runs in one
/// replica and the gateway in all, and every move passes through `migrating`, which a
/// copy read during the move sees (connections then wait for the move).
struct Routes {
    store: Store,
    ttl: Duration,
    table: tokio::sync::Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// When the copy was read (when its read began): `None` before the first read.
    read_at: Option<Instant>,
    /// When a read last began, whether it succeeded or not.
    tried_at: Option<Instant>,
    /// When a read last failed, if the last one did.
    failed_at: Option<Instant>,
    ports: HashMap<u16, EndpointTarget>,
}

impl Routes {
    /// The live rental of `port`, from a copy read after `since` (`None`: a copy younger
    /// than the TTL, or, while the database fails, the last one read: tenants keep
    /// logging in through a database outage).
    async fn route(
        &self,
        port: u16,
        since: Option<Instant>,
    ) -> Result<Option<EndpointTarget>, StoreError> {
        let mut table = self.table.lock().await;
        let fresh = table.read_at.is_some_and(|at| match since {
            Some(since) => at >= since,
            None => at.elapsed() < self.ttl,
        });
        let stale_will_do = since.is_none() && table.read_at.is_some();
        let failing = table.failed_at.is_some_and(|at| at.elapsed() < self.ttl);
        // The database failed moments ago: the copy in hand rather than a wait on it.
        let stale_now = stale_will_do && failing;
        if !fresh && !stale_now {
            if let Some(tried) = table.tried_at {
                tokio::time::sleep_until(tried + WAIT_STEP).await;
            }
            let began = Instant::now();
            table.tried_at = Some(began);
            metrics::counter!(crate::metrics::names::GATEWAY_LOOKUPS).increment(1);
            match self.store.endpoint_targets().await {
                Ok(rows) => {
                    table.ports = rows.into_iter().collect();
                    table.read_at = Some(began);
                    table.failed_at = None;
                }
                Err(e) => {
                    table.failed_at = Some(Instant::now());
                    if !stale_will_do {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "gateway cannot read its rentals; serving the last copy");
                }
            }
        }
        Ok(table.ports.get(&port).cloned())
    }
}

/// How many of something each key holds at once; each one is held through a [`Held`]
/// that gives it back when dropped.
struct Tally<K> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> Tally<K> {
    /// One more for `key`, unless it holds `max` already.
    fn take(self: &Arc<Self>, key: K, max: usize) -> Option<Held<K>> {
        let mut counts = self.counts.lock().expect("tally poisoned");
        let held = counts.entry(key).or_default();
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(Held {
            tally: self.clone(),
            key,
        })
    }
}

/// One of a key's count in a [`Tally`], until dropped.
struct Held<K: Hash + Eq + Copy> {
    tally: Arc<Tally<K>>,
    key: K,
}

impl<K: Hash + Eq + Copy> Drop for Held<K> {
    fn drop(&mut self) {
        let mut counts = self.tally.counts.lock().expect("tally poisoned");
        if let Some(held) = counts.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_refuses_beyond_its_max_and_forgets_a_key_given_back() {
        let tally = Arc::new(Tally::default());
        let first = tally.take(7u16, 2).expect("room");
        let second = tally.take(7u16, 2).expect("room");
        assert!(tally.take(7u16, 2).is_none());
        assert!(
            tally.take(8u16, 2).is_some(),
            "another key has its own count"
        );
        drop(first);
        let third = tally.take(7u16, 2).expect("room again");
        drop((second, third));
        assert!(tally.counts.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_source_counts_by_its_64_and_a_mapped_ipv4_as_itself() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
