//! Tenant accounts left on workers by rentals that no longer live there: which are
//! pending, and the placement's end once the account is gone.

use sqlx::FromRow;

use super::placements::release_placement;
use super::workers::WORKER_COLUMNS;
use super::{Store, StoreError, Worker, events, retry_on_conflict};

/// A tenant account left on a worker by a rental that no longer lives there.
#[derive(Debug, Clone, FromRow)]
pub struct Cleanup {
    pub placement_id: u64,
    #[sqlx(rename = "placement_rental")]
    pub rental_id: String,
    pub username: String,
    /// The account's uid (`None` for a placement made before Orion allocated uids).
    #[sqlx(rename = "placement_uid")]
    pub uid: Option<u32>,
    #[sqlx(flatten)]
    pub worker: Worker,
}

impl Store {
    /// Tenant accounts left on alive workers by rentals that no longer live there
    /// (released, failed, or moved away): they must be removed before the worker is
    /// offered again.
    pub async fn pending_cleanups(&self) -> Result<Vec<Cleanup>, StoreError> {
        let columns: String = WORKER_COLUMNS
            .split(", ")
            .map(|c| format!("w.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        // Drained and retired workers are cleaned too: only a worker that answers and
        // is trusted can be. The account a rental is moving off stays until the move is
        // over: a planned move takes its final snapshot there first.
        Ok(sqlx::query_as(&format!(
            "SELECT p.id AS placement_id, p.rental_id AS placement_rental, p.uid AS placement_uid, \
             r.username, {columns} \
             FROM placements p JOIN workers w ON w.id = p.worker_id \
             JOIN rentals r ON r.id = p.rental_id \
             WHERE p.state = 'stale' \
             AND p.worker_id IN (SELECT id FROM workers WHERE {answers}) \
             AND NOT (r.status = 'migrating' AND p.worker_id <> COALESCE(r.worker_id, 0)) \
             ORDER BY p.id",
            answers = Worker::ANSWERS_SQL,
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The account of a stale placement is gone from its worker: the placement becomes
    /// history and the worker is free again (unless another stale placement holds it).
    pub async fn finish_cleanup(&self, cleanup: &Cleanup) -> Result<(), StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            release_placement(
                &mut tx,
                cleanup.placement_id,
                cleanup.worker.id,
                &cleanup.rental_id,
            )
            .await?;
            let msg = format!("removed leftover account `{}`", cleanup.username);
            events::append_in(
                &mut tx,
                "worker.cleaned",
                Some(&cleanup.worker.name),
                Some(&cleanup.rental_id),
                &msg,
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}
