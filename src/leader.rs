//! Leading the control loops: several `orion` processes may serve the API from one
//! database, but exactly one runs the loops at a time — the holder of the `loops` lease
//! ([`crate::store::Store::acquire_lease`]). Every process tries to take or renew it each
//! `leader.renew_every`; a lease not renewed for `leader.lease` expires (by the
//! database's clock) and the next try of another process takes it over, with the next
//! epoch. A process stops leading as soon as it cannot renew: when the database says
//! another holds the lease, or when its own last renewal is older than the lease (it
//! cannot tell, so it assumes the worst). And should a paused or cut-off process still
//! try to write, the loops' store refuses the write in the database itself
//! ([`crate::store::Fence`]): leading is checked where the write happens, not only here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Fence, LOOPS, Lease, Store};

/// Whether this process leads the loops, and with which epoch.
#[derive(Debug)]
pub struct Leadership {
    instance: String,
    /// The lease's holder: the instance and a nonce of this start, so that two
    /// processes given the same name (a restart beside the old one) never both hold it.
    holder: String,
    /// The epoch this process leads with; 0 while it does not lead.
    epoch: Arc<AtomicU64>,
    changes: watch::Sender<u64>,
}

impl Leadership {
    pub fn new(instance: String) -> Self {
        let holder = format!("{instance}#{:08x}", rand::random::<u32>());
        Self {
            instance,
            holder,
            epoch: Arc::new(AtomicU64::new(0)),
            changes: watch::channel(0).0,
        }
    }

    /// A process that leads with no lease behind it: tests of the loop driver only.
    #[cfg(test)]
    pub(crate) fn leading_alone(instance: &str) -> Self {
        let leadership = Self::new(instance.to_owned());
        leadership.set(1);
        leadership
    }

    /// This process's name among the replicas (`leader.instance`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// This process's holder name: its instance and a nonce of its start. What the lease,
    /// the `replicas` table and the requests it runs name it by.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The epoch this process leads with, if it leads.
    pub fn epoch(&self) -> Option<u64> {
        Some(self.epoch.load(Ordering::SeqCst)).filter(|e| *e != 0)
    }

    pub fn is_leading(&self) -> bool {
        self.epoch().is_some()
    }

    /// Resolves once this process leads (at once if it does).
    pub async fn leading(&self) {
        self.until(true).await
    }

    /// Resolves once this process does not lead (at once if it does not).
    pub async fn stepped_down(&self) {
        self.until(false).await
    }

    async fn until(&self, leading: bool) {
        let mut changes = self.changes.subscribe();
        while self.is_leading() != leading {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// What the loops' store checks at every write.
    pub fn fence(&self) -> Fence {
        Fence {
            holder: self.holder.clone(),
            epoch: self.epoch.clone(),
        }
    }

    fn set(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        self.changes.send_replace(epoch);
    }
}

/// One try at taking or keeping the lease, bounded by `within`: `Some(true)` if this
/// process leads now, `Some(false)` if another does, `None` if the database could not
/// say (then nothing changes here; [`run`] decides).
pub async fn try_lead(
    store: &Store,
    leadership: &Leadership,
    lease: Duration,
    within: Duration,
) -> Option<bool> {
    let before = leadership.epoch();
    let tried = tokio::time::timeout(
        within,
        store.acquire_lease(LOOPS, &leadership.holder, lease),
    )
    .await;
    match tried {
        Ok(Ok(Lease::Held { epoch, taken })) => {
            if taken || before != Some(epoch) {
                tracing::info!(instance = leadership.instance(), epoch, "leading the loops");
            }
            leadership.set(epoch);
            Some(true)
        }
        Ok(Ok(Lease::Other { holder })) => {
            if let Some(epoch) = before {
                tracing::warn!(instance = leadership.instance(), epoch, %holder,
                    "lost the loops' lease to another process");
                store
                    .append_event(
                        "leader.lost",
                        None,
                        None,
                        &format!(
                            "{} no longer leads the loops (epoch {epoch}): {holder} does",
                            leadership.holder
                        ),
                    )
                    .await
                    .ok();
            }
            leadership.set(0);
            Some(false)
        }
        Ok(Err(e)) => {
            tracing::warn!(instance = leadership.instance(), error = %e, "cannot renew the loops' lease");
            None
        }
        Err(_) => {
            tracing::warn!(
                instance = leadership.instance(),
                "the loops' lease: no answer in time"
            );
            None
        }
    }
}

/// Takes or renews the lease every `renew_every` until `shutdown`. A leader whose last
/// successful renewal *started* a whole lease ago stops leading on its own: the database
/// may have let the lease expire since. It does not give the lease up: [`give_up`] does,
/// once the loops' last passes are over.
pub async fn run(
    store: Store,
    leadership: Arc<Leadership>,
    lease: Duration,
    renew_every: Duration,
    shutdown: CancellationToken,
) {
    let mut renewed = tokio::time::Instant::now();
    loop {
        let started = tokio::time::Instant::now();
        // Alive, leading or not: the requests this process runs are its own.
        // Bounded like the try below: a database that hangs must not hold the step-down.
        let said = tokio::time::timeout(
            renew_every / 2,
            store.heartbeat(&leadership.holder, leadership.instance()),
        )
        .await;
        if !matches!(said, Ok(Ok(()))) {
            tracing::debug!("cannot say this process is alive");
        }
        match try_lead(&store, &leadership, lease, renew_every).await {
            Some(true) => renewed = started,
            Some(false) => {}
            None if leadership.is_leading() && renewed.elapsed() >= lease => {
                tracing::warn!(
                    instance = leadership.instance(),
                    "no renewal of the loops' lease for a whole lease: no longer leading"
                );
                leadership.set(0);
            }
            None => {}
        }
        tokio::select! {
            () = tokio::time::sleep(renew_every) => {}
            () = shutdown.cancelled() => break,
        }
    }
}

/// Gives the lease up (a clean shutdown, after the loops stopped): another process takes
/// it at its next try instead of waiting for it to expire.
pub async fn give_up(store: &Store, leadership: &Leadership) {
    if let Some(epoch) = leadership.epoch() {
        leadership.set(0);
        if let Err(e) = store.release_lease(LOOPS, &leadership.holder, epoch).await {
            tracing::warn!(error = %e, "cannot give the loops' lease up; it expires by itself");
        }
    }
}
