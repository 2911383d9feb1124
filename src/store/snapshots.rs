//! Snapshots of rentals' homes, stored in chunks.
//!
//! A snapshot is written chunk by chunk under its own id and becomes the rental's only
//! once complete ([`Store::finish_snapshot`]), which makes the older one obsolete: a
//! snapshot cut short (the worker died mid-stream) never replaces a whole one, and a
//! rental has at most one complete snapshot that is not obsolete. Obsolete snapshots
//! (replaced, cut short, of ended rentals) are deleted a few chunks at a time by
//! [`Store::purge_snapshots`].

use chrono::{DateTime, Utc};
use sqlx::FromRow;

use super::workers::{WORKER_COLUMNS, Worker};
use super::{Store, StoreError, events, retry_on_conflict};

/// A rental's last complete snapshot.
#[derive(Debug, Clone, FromRow)]
pub struct SnapshotInfo {
    pub id: u64,
    pub rental_id: String,
    pub fingerprint: String,
    pub bytes: u64,
    pub taken_at: DateTime<Utc>,
}

/// An active rental whose home the snapshot loop looks at.
#[derive(Debug, Clone)]
pub struct SnapshotJob {
    pub rental_id: String,
    pub username: String,
    /// The account's uid on its worker.
    pub uid: u32,
    pub worker: Worker,
    /// The fingerprint of its home at the last look: of its last snapshot, or of a home
    /// found over the size cap (`None`: none yet).
    pub fingerprint: Option<String>,
}

/// Incomplete snapshots older than this are abandoned (their writer died).
const ABANDONED_AFTER_SECS: u32 = 3600;

/// Chunks deleted per statement when purging.
const PURGE_BATCH: u32 = 8;

#[derive(FromRow)]
struct JobRow {
    rental_id: String,
    username: String,
    uid: u32,
    worker_id: u64,
    fingerprint: Option<String>,
}

impl Store {
    /// Every active rental on a usable worker, with its account's uid there and its last
    /// snapshot's fingerprint.
    pub async fn snapshot_jobs(&self) -> Result<Vec<SnapshotJob>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(
            "SELECT r.id AS rental_id, r.username, p.uid, r.worker_id, \
             COALESCE(r.snapshot_oversize, (SELECT s.fingerprint FROM snapshots s \
              WHERE s.rental_id = r.id AND s.complete AND NOT s.obsolete LIMIT 1)) AS fingerprint \
             FROM rentals r JOIN placements p ON p.rental_id = r.id \
             AND p.worker_id = r.worker_id AND p.state = 'active' \
             WHERE r.status = 'active' AND p.uid IS NOT NULL ORDER BY r.created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        let workers: Vec<Worker> = sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE {usable}",
            usable = Worker::USABLE_SQL,
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let worker = workers.iter().find(|w| w.id == row.worker_id)?.clone();
                Some(SnapshotJob {
                    rental_id: row.rental_id,
                    username: row.username,
                    uid: row.uid,
                    worker,
                    fingerprint: row.fingerprint,
                })
            })
            .collect())
    }

    /// The rental's last complete snapshot.
    pub async fn latest_snapshot(
        &self,
        rental_id: &str,
    ) -> Result<Option<SnapshotInfo>, StoreError> {
        Ok(self.latest_snapshots(&[rental_id]).await?.pop())
    }

    /// The last complete snapshot of each of `rental_ids` (for the rentals' views).
    pub async fn latest_snapshots(
        &self,
        rental_ids: &[&str],
    ) -> Result<Vec<SnapshotInfo>, StoreError> {
        if rental_ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; rental_ids.len()].join(", ");
        let sql = format!(
            "SELECT id, rental_id, fingerprint, bytes, taken_at FROM snapshots \
             WHERE complete AND NOT obsolete AND rental_id IN ({marks})"
        );
        let mut query = sqlx::query_as(&sql);
        for id in rental_ids {
            query = query.bind(*id);
        }
        Ok(query.fetch_all(&self.pool).await?)
    }

    /// Starts a snapshot of the rental's home taken on `worker_id`, now.
    pub async fn begin_snapshot(&self, rental_id: &str, worker_id: u64) -> Result<u64, StoreError> {
        let done = self
            .write(
                sqlx::query(
                    "INSERT INTO snapshots (rental_id, worker_id, fingerprint, taken_at) \
             VALUES (?, ?, '', UTC_TIMESTAMP(6))",
                )
                .bind(rental_id)
                .bind(worker_id),
            )
            .await?;
        Ok(done.last_insert_id())
    }

    /// One chunk of a snapshot being written.
    pub async fn put_snapshot_chunk(
        &self,
        snapshot_id: u64,
        seq: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query("INSERT INTO snapshot_chunks (snapshot_id, seq, data) VALUES (?, ?, ?)")
                .bind(snapshot_id)
                .bind(seq)
                .bind(data),
        )
        .await?;
        Ok(())
    }

    /// The snapshot is whole: it becomes the rental's, and the older one obsolete — if
    /// the rental is still active on the worker it was taken on, or (`moving`, a planned
    /// move's last snapshot) is moving off it, and if nothing made this snapshot obsolete
    /// meanwhile. Otherwise it is obsolete itself and false returned: the rental moved
    /// or ended, and this is not a snapshot of its current home.
    pub async fn finish_snapshot(
        &self,
        snapshot_id: u64,
        rental_id: &str,
        worker_id: u64,
        fingerprint: &str,
        bytes: u64,
        moving: bool,
    ) -> Result<bool, StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            // The rental's row lock: snapshots of one rental finish one at a time.
            let current: Option<(String, Option<u64>)> =
                sqlx::query_as("SELECT status, worker_id FROM rentals WHERE id = ? FOR UPDATE")
                    .bind(rental_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let still_its = match current {
                Some((status, worker)) if !moving => {
                    status == "active" && worker == Some(worker_id)
                }
                Some((status, _)) => status == "migrating",
                None => false,
            };
            let completed = still_its
                && sqlx::query(
                    "UPDATE snapshots SET complete = TRUE, fingerprint = ?, bytes = ? \
                     WHERE id = ? AND NOT complete AND NOT obsolete",
                )
                .bind(fingerprint)
                .bind(bytes)
                .bind(snapshot_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
            if !completed {
                mark_obsolete(&mut tx, snapshot_id).await?;
                tx.commit().await?;
                return Ok(false);
            }
            sqlx::query(
                "UPDATE snapshots SET obsolete = TRUE \
                 WHERE rental_id = ? AND complete AND id <> ?",
            )
            .bind(rental_id)
            .bind(snapshot_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE rentals SET snapshot_oversize = NULL WHERE id = ?")
                .bind(rental_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// Drops a snapshot that was cut short (its chunks go with the next purge).
    pub async fn discard_snapshot(&self, snapshot_id: u64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        mark_obsolete(&mut tx, snapshot_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The rental's home (of `fingerprint`) is over the size cap: its last snapshot is
    /// kept, and the home is not streamed again until it changes. The event is written
    /// when it goes over, not at every look; returns whether it was.
    pub async fn snapshot_oversize(
        &self,
        rental_id: &str,
        fingerprint: &str,
        worker: &str,
        message: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let was: Option<Option<String>> =
            sqlx::query_scalar("SELECT snapshot_oversize FROM rentals WHERE id = ? FOR UPDATE")
                .bind(rental_id)
                .fetch_optional(&mut *tx)
                .await?;
        let newly = matches!(was, Some(None));
        sqlx::query("UPDATE rentals SET snapshot_oversize = ? WHERE id = ?")
            .bind(fingerprint)
            .bind(rental_id)
            .execute(&mut *tx)
            .await?;
        if newly {
            events::append_in(
                &mut tx,
                "snapshot.too_big",
                Some(worker),
                Some(rental_id),
                message,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(newly)
    }

    /// One chunk of a snapshot, in order from 0; `None` past the last.
    pub async fn snapshot_chunk(
        &self,
        snapshot_id: u64,
        seq: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar(
                "SELECT data FROM snapshot_chunks WHERE snapshot_id = ? AND seq = ?",
            )
            .bind(snapshot_id)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    /// Deletes obsolete snapshots, abandoned ones and those of rentals that are over,
    /// a few chunks per statement. Returns how many snapshots went.
    pub async fn purge_snapshots(&self) -> Result<u64, StoreError> {
        let doomed: Vec<u64> = sqlx::query_scalar(&format!(
            "SELECT id FROM snapshots WHERE obsolete \
             OR (NOT complete AND taken_at < UTC_TIMESTAMP(6) - INTERVAL {ABANDONED_AFTER_SECS} SECOND) \
             OR rental_id IN (SELECT id FROM rentals WHERE status IN ('released', 'failed'))"
        ))
        .fetch_all(&self.pool)
        .await?;
        for id in &doomed {
            while self.write(sqlx::query(&format!(
                "DELETE FROM snapshot_chunks WHERE snapshot_id = ? ORDER BY seq LIMIT {PURGE_BATCH}"
            ))
            .bind(id)
            )
            .await?
            .rows_affected()
                > 0
            {}
            self.write(sqlx::query("DELETE FROM snapshots WHERE id = ?").bind(id))
                .await?;
        }
        Ok(doomed.len() as u64)
    }
}

/// Marks a snapshot obsolete, in the caller's transaction.
async fn mark_obsolete(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    snapshot_id: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE snapshots SET obsolete = TRUE WHERE id = ?")
        .bind(snapshot_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
