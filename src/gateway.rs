//! The SSH gateway: a stable address per rental. Each live rental is given one port of
//! `gateway.ports` for its whole life; a connection to that port is forwarded, byte for
//! byte, to the SSH server of the worker serving the rental now — after a move, the new
//! one. SSH runs end to end between the tenant's client and the worker: the gateway
//! holds no tenant secret and sees only ciphertext.
//!
//! A connection that arrives while its rental is moving waits (up to `gateway.wait`) for
//! the move to finish rather than being refused, so a client that reconnects at once
//! after its worker died lands on the new worker. The port's rental is read from the
//! database at each connection: every control-plane replica forwards every port.

use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::model::RentalStatus;
use crate::store::Store;

/// How often a waiting connection looks again at its rental.
const WAIT_STEP: Duration = Duration::from_millis(100);

/// Connections the gateway holds at once, forwarded or waiting, all ports together:
/// beyond, a new connection is closed at once. Each waiting one reads the database
/// every [`WAIT_STEP`], so this also bounds what idle connections cost the database.
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

/// Where one connection goes, and how long it may wait for that.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub store: Store,
    /// Bound on reaching the worker's SSH server.
    pub connect_timeout: Duration,
    /// How long a connection waits for its rental to be active on a reachable worker.
    pub wait: Duration,
    /// Room for more connections ([`MAX_CONNECTIONS`]).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Forwarding {
    pub fn new(store: Store, connect_timeout: Duration, wait: Duration) -> Self {
        Self {
            store,
            connect_timeout,
            wait,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }
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
                                metrics::counter!(crate::metrics::names::GATEWAY_CONNECTIONS,
                                    "outcome" => "busy")
                                .increment(1);
                                tracing::warn!(port, %peer, "gateway full: connection closed");
                                continue;
                            };
                            let forwarding = forwarding.clone();
                            tokio::spawn(async move {
                                forward(&forwarding, port, client, peer).await;
                                drop(slot);
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

/// Forwards one client connection on `port` to its rental's worker, for as long as both
/// ends keep it open.
async fn forward(
    forwarding: &Forwarding,
    port: u16,
    mut client: TcpStream,
    peer: std::net::SocketAddr,
) {
    tune(&client);
    let Some((rental_id, mut worker)) = reach(forwarding, port).await else {
        metrics::counter!(crate::metrics::names::GATEWAY_CONNECTIONS, "outcome" => "refused")
            .increment(1);
        tracing::info!(port, %peer, "gateway connection closed: no active rental reachable on this port");
        return;
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

/// Connects to the worker serving the rental of `port`, waiting through a move. `None`
/// if the port has no live rental, or none became reachable in time.
async fn reach(forwarding: &Forwarding, port: u16) -> Option<(String, TcpStream)> {
    let deadline = tokio::time::Instant::now() + forwarding.wait;
    loop {
        match forwarding.store.endpoint_target(port).await {
            Ok(None) => return None,
            Ok(Some(target)) => {
                if target.status == RentalStatus::Active
                    && let Some((host, ssh_port)) = &target.worker
                {
                    let connect = TcpStream::connect((host.as_str(), *ssh_port));
                    match tokio::time::timeout(forwarding.connect_timeout, connect).await {
                        Ok(Ok(stream)) => return Some((target.rental_id, stream)),
                        Ok(Err(e)) => {
                            tracing::debug!(port, error = %e, "worker not reachable; waiting")
                        }
                        Err(_) => tracing::debug!(port, "worker not answering; waiting"),
                    }
                } else if !target.status.may_become_active() {
                    return None;
                }
            }
            // A database blip: keep the client waiting rather than drop it.
            Err(e) => tracing::warn!(port, error = %e, "gateway cannot read its rental; retrying"),
        }
        if tokio::time::Instant::now() + WAIT_STEP > deadline {
            return None;
        }
        tokio::time::sleep(WAIT_STEP).await;
    }
}
