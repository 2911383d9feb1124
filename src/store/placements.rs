//! Placements: each stay of a rental on a worker, and the uid its account has there.
//!
//! The statements here are shared by rentals (a rent, a move, a release) and workers (the
//! cleanup of a leftover account); keeping them apart from both avoids a cycle between
//! the two.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, MySql, Transaction};

use super::StoreError;
use crate::model::PlacementState;

/// One stay of a rental on a worker, as its history lists it.
#[derive(Debug, Clone, FromRow)]
pub struct PlacementRecord {
    pub rental_id: String,
    /// The worker's name.
    pub worker: String,
    pub state: PlacementState,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// The placements of these rentals, in the order they were made, in one statement.
pub(super) async fn placements_of<'e, E>(
    executor: E,
    rental_ids: &[&str],
) -> Result<Vec<PlacementRecord>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = MySql>,
{
    if rental_ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks = vec!["?"; rental_ids.len()].join(", ");
    let sql = format!(
        "SELECT p.rental_id, w.name AS worker, p.state, p.started_at, p.ended_at \
         FROM placements p JOIN workers w ON w.id = p.worker_id \
         WHERE p.rental_id IN ({marks}) ORDER BY p.id"
    );
    let mut query = sqlx::query_as(&sql);
    for id in rental_ids {
        query = query.bind(*id);
    }
    query.fetch_all(executor).await
}

/// Records a new placement of `rental_id` on `worker_id` and gives its account a uid of
/// its own: `uid_min` + the placement's id, which no other placement ever has.
pub(super) async fn insert_placement(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    worker_id: u64,
    uid_min: u32,
) -> Result<u32, StoreError> {
    let id = sqlx::query(
        "INSERT INTO placements (rental_id, worker_id, state, started_at) \
         VALUES (?, ?, 'provisioning', UTC_TIMESTAMP(6))",
    )
    .bind(rental_id)
    .bind(worker_id)
    .execute(&mut **tx)
    .await?
    .last_insert_id();
    // uid 4294967295 is (uid_t) -1, "no uid", to the kernel.
    let uid = u32::try_from(id)
        .ok()
        .and_then(|id| uid_min.checked_add(id))
        .filter(|uid| *uid < u32::MAX)
        .ok_or_else(|| StoreError::Invariant(format!("no uid left above {uid_min}")))?;
    sqlx::query("UPDATE placements SET uid = ? WHERE id = ?")
        .bind(uid)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(uid)
}

/// The uid of the rental's live placement on a worker (`None` if it has none, or if the
/// placement predates uid allocation).
pub(super) async fn live_uid<'e, E>(
    executor: E,
    rental_id: &str,
    worker_id: u64,
) -> Result<Option<u32>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = MySql>,
{
    let uid: Option<Option<u32>> = sqlx::query_scalar(
        "SELECT uid FROM placements WHERE rental_id = ? AND worker_id = ? \
         AND state IN ('provisioning', 'active') ORDER BY id DESC LIMIT 1",
    )
    .bind(rental_id)
    .bind(worker_id)
    .fetch_optional(executor)
    .await?;
    Ok(uid.flatten())
}

/// Marks the rental's live placement on a worker stale: the account may still be there.
pub(super) async fn stale_live_placement(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    worker_id: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE placements SET state = 'stale', ended_at = UTC_TIMESTAMP(6) \
         WHERE rental_id = ? AND worker_id = ? AND state IN ('provisioning', 'active')",
    )
    .bind(rental_id)
    .bind(worker_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Ends the rental's live placement on a worker: released (and the worker freed) when its
/// account is gone, stale when the account may still be there.
pub(super) async fn end_placement(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    worker_id: u64,
    account_removed: bool,
) -> Result<(), sqlx::Error> {
    let placement: Option<u64> = sqlx::query_scalar(
        "SELECT id FROM placements WHERE rental_id = ? AND worker_id = ? \
         AND state IN ('provisioning', 'active') ORDER BY id DESC LIMIT 1",
    )
    .bind(rental_id)
    .bind(worker_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(placement_id) = placement else {
        return Ok(());
    };
    if account_removed {
        release_placement(tx, placement_id, worker_id, rental_id).await
    } else {
        stale_live_placement(tx, rental_id, worker_id).await
    }
}

/// Ends a placement whose account is gone, and frees its worker if this rental held it.
pub(super) async fn release_placement(
    tx: &mut Transaction<'_, MySql>,
    placement_id: u64,
    worker_id: u64,
    rental_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE placements SET state = 'released', ended_at = COALESCE(ended_at, UTC_TIMESTAMP(6)) \
         WHERE id = ?",
    )
    .bind(placement_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE workers SET rental_id = NULL, updated_at = UTC_TIMESTAMP(6) \
         WHERE id = ? AND rental_id = ?",
    )
    .bind(worker_id)
    .bind(rental_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
