//! The gateway's ports: which live rental each one leads to.

use std::ops::RangeInclusive;

use sqlx::{FromRow, MySql, Transaction};

use super::{Store, StoreError};
use crate::model::RentalStatus;

/// Ports looked at, least recently given first, when a rental is given one. Each is then
/// locked alone (`SKIP LOCKED`), so concurrent rents take different ports without
/// locking every free row.
const CANDIDATES: u32 = 32;

/// Where a connection to a gateway port goes.
#[derive(Debug, Clone, FromRow)]
pub struct EndpointTarget {
    pub rental_id: String,
    pub status: RentalStatus,
    /// The SSH address Orion reaches the rental's worker at (`None`: no worker now).
    #[sqlx(skip)]
    pub worker: Option<(String, u16)>,
    #[sqlx(default)]
    ssh_host: Option<String>,
    #[sqlx(default)]
    ssh_port: Option<u16>,
}

/// One row of [`Store::endpoint_targets`].
#[derive(FromRow)]
struct PortTarget {
    port: u16,
    #[sqlx(flatten)]
    target: EndpointTarget,
}

impl Store {
    /// Makes sure every port of `ports` has its row (ports outside are kept, never given).
    pub async fn sync_endpoints(&self, ports: RangeInclusive<u16>) -> Result<(), StoreError> {
        // Numbers only: written into the statement, they cannot inject anything.
        let rows: Vec<String> = ports.map(|p| format!("({p})")).collect();
        for batch in rows.chunks(1024) {
            self.write(sqlx::query(&format!(
                "INSERT IGNORE INTO endpoints (port) VALUES {}",
                batch.join(", ")
            )))
            .await?;
        }
        Ok(())
    }

    /// Every port leading to a live rental (not released, not failed), with the rental
    /// and its worker's SSH address: the gateway's whole table in one read, which it
    /// keeps in memory (see [`crate::gateway`]).
    pub async fn endpoint_targets(&self) -> Result<Vec<(u16, EndpointTarget)>, StoreError> {
        let rows: Vec<PortTarget> = sqlx::query_as(
            "SELECT e.port, r.id AS rental_id, r.status, w.ssh_host, w.ssh_port \
             FROM endpoints e JOIN rentals r ON r.id = e.rental_id \
             LEFT JOIN workers w ON w.id = r.worker_id \
             WHERE r.status NOT IN ('released', 'failed')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let mut t = row.target;
                t.worker = t.ssh_host.take().zip(t.ssh_port);
                (row.port, t)
            })
            .collect())
    }
}

/// Gives `rental_id` a free port of `ports`, in the caller's transaction: the one given
/// longest ago (never given first). `None` when every port is held by a live rental.
pub(super) async fn claim_endpoint(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    ports: &RangeInclusive<u16>,
) -> Result<Option<u16>, sqlx::Error> {
    // Every candidate can be held by a concurrent rent; a second look finds others.
    for _ in 0..3 {
        let candidates: Vec<u16> = sqlx::query_scalar(&format!(
            "SELECT e.port FROM endpoints e LEFT JOIN rentals r ON r.id = e.rental_id \
             WHERE e.port BETWEEN ? AND ? \
             AND (e.rental_id IS NULL OR r.status IN ('released', 'failed')) \
             ORDER BY r.ended_at IS NOT NULL, r.ended_at, e.port LIMIT {CANDIDATES}"
        ))
        .bind(ports.start())
        .bind(ports.end())
        .fetch_all(&mut **tx)
        .await?;
        if candidates.is_empty() {
            return Ok(None);
        }
        for port in candidates {
            if take_port(tx, rental_id, port).await? {
                return Ok(Some(port));
            }
        }
    }
    Ok(None)
}

/// Gives `port` to `rental_id` if nobody holds it now. Locking reads only: a plain read
/// would see the transaction's snapshot, where a rent that took the port since is
/// invisible.
async fn take_port(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    port: u16,
) -> Result<bool, sqlx::Error> {
    let locked: Option<Option<String>> =
        sqlx::query_scalar("SELECT rental_id FROM endpoints WHERE port = ? FOR UPDATE SKIP LOCKED")
            .bind(port)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(holder) = locked else {
        return Ok(false); // another rent is taking it
    };
    if let Some(holder) = holder {
        let status: Option<RentalStatus> =
            sqlx::query_scalar("SELECT status FROM rentals WHERE id = ? LOCK IN SHARE MODE")
                .bind(&holder)
                .fetch_optional(&mut **tx)
                .await?;
        // Not over, or not visible yet: taken.
        if !status.is_some_and(|s| matches!(s, RentalStatus::Released | RentalStatus::Failed)) {
            return Ok(false);
        }
    }
    sqlx::query("UPDATE endpoints SET rental_id = ? WHERE port = ?")
        .bind(rental_id)
        .bind(port)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}
