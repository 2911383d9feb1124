//! The loops' leader lease and the fence every loop write passes.

use std::time::Duration;

use sqlx::{MySql, Transaction};

use super::{Store, StoreError, events, retry_on_conflict};

/// The lease of the control loops.
pub const LOOPS: &str = "loops";

/// What trying to lead gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This process leads with this epoch (`taken`: it just took the lease over).
    Held { epoch: u64, taken: bool },
    /// Another process leads.
    Other { holder: String },
}

/// A loop's writes carry this: they happen only while `holder` leads with `epoch`.
#[derive(Debug, Clone)]
pub struct Fence {
    pub holder: String,
    /// The epoch this process leads with; 0 while it does not lead.
    pub epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Takes, keeps or renews lease `name` for `holder` for `ttl` more, or says who holds
    /// it. A lease that expired (by the database's clock) is taken over with the next
    /// epoch, even by its own holder, so that nothing written under the old one can
    /// count as written under the new one.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let ttl_micros = ttl.as_micros() as u64;
        retry_on_conflict(|| async move {
            let mut tx = self.pool.begin().await?;
            let row: Option<(String, u64, bool)> = sqlx::query_as(
                "SELECT holder, epoch, expires_at <= UTC_TIMESTAMP(6) FROM leases \
                 WHERE name = ? FOR UPDATE",
            )
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
            let lease = match row {
                None => {
                    sqlx::query(
                        "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at) \
                         VALUES (?, ?, 1, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                         UTC_TIMESTAMP(6))",
                    )
                    .bind(name)
                    .bind(holder)
                    .bind(ttl_micros)
                    .execute(&mut *tx)
                    .await?;
                    Lease::Held {
                        epoch: 1,
                        taken: true,
                    }
                }
                Some((current, epoch, false)) if current == holder => {
                    sqlx::query(
                        "UPDATE leases SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                         WHERE name = ?",
                    )
                    .bind(ttl_micros)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                    Lease::Held {
                        epoch,
                        taken: false,
                    }
                }
                Some((_, epoch, true)) => {
                    sqlx::query(
                        "UPDATE leases SET holder = ?, epoch = ?, \
                         expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                         acquired_at = UTC_TIMESTAMP(6) WHERE name = ?",
                    )
                    .bind(holder)
                    .bind(epoch + 1)
                    .bind(ttl_micros)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                    Lease::Held {
                        epoch: epoch + 1,
                        taken: true,
                    }
                }
                Some((current, _, false)) => Lease::Other { holder: current },
            };
            if let Lease::Held { epoch, taken: true } = lease {
                events::append_in(
                    &mut tx,
                    "leader.acquired",
                    None,
                    None,
                    &format!("{holder} leads the loops (epoch {epoch})"),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(lease)
        })
        .await
    }

    /// Says that the process `holder` (named `instance`) is alive; once a
    /// `leader.renew_every`, by every process. Processes not seen for a day are forgotten.
    pub async fn heartbeat(&self, holder: &str, instance: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (holder, instance, started_at, seen_at) \
             VALUES (?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)) \
             ON DUPLICATE KEY UPDATE seen_at = UTC_TIMESTAMP(6)",
        )
        .bind(holder)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets the processes not seen for `age`. Returns how many.
    pub async fn purge_replicas(&self, age: Duration) -> Result<u64, StoreError> {
        Ok(self
            .write(
                sqlx::query(
                    "DELETE FROM replicas WHERE seen_at < UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
                )
                .bind(age.as_secs()),
            )
            .await?
            .rows_affected())
    }

    /// Gives lease `name` up at once (a clean shutdown): another process takes it at its
    /// next try instead of waiting for it to expire.
    pub async fn release_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let released = sqlx::query(
            "UPDATE leases SET expires_at = UTC_TIMESTAMP(6) \
             WHERE name = ? AND holder = ? AND epoch = ?",
        )
        .bind(name)
        .bind(holder)
        .bind(epoch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released > 0 {
            events::append_in(
                &mut tx,
                "leader.lost",
                None,
                None,
                &format!("{holder} gave the loops up (epoch {epoch}): shutting down"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Who holds lease `name`, with which epoch, if it has not expired.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<(String, u64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT holder, epoch FROM leases WHERE name = ? AND expires_at > UTC_TIMESTAMP(6)",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// The first statement of every transaction of a fenced store: proves, in the
/// transaction itself, that its process still leads with its epoch and an unexpired
/// lease; otherwise nothing is written ([`StoreError::Fenced`]).
pub(super) async fn pass_fence(
    tx: &mut Transaction<'_, MySql>,
    fence: &Fence,
) -> Result<(), StoreError> {
    let epoch = fence.epoch.load(std::sync::atomic::Ordering::SeqCst);
    if epoch == 0 {
        return Err(StoreError::Fenced {
            holder: fence.holder.clone(),
            epoch,
        });
    }
    let passed = sqlx::query(
        "UPDATE leases SET fenced_writes = fenced_writes + 1 \
         WHERE name = ? AND holder = ? AND epoch = ? AND expires_at > UTC_TIMESTAMP(6)",
    )
    .bind(LOOPS)
    .bind(&fence.holder)
    .bind(epoch)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if passed != 1 {
        return Err(StoreError::Fenced {
            holder: fence.holder.clone(),
            epoch,
        });
    }
    Ok(())
}
