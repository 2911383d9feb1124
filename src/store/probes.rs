//! What probes observed, written to the workers' rows: a probe's conclusion (with its
//! event when the status changes), a round's routine successes in bulk, and failures
//! that have not yet made a worker dead.

use super::{Store, StoreError, Worker, events};
use crate::model::WorkerStatus;

/// What one probe concluded, ready to be written.
#[derive(Debug, Clone)]
pub struct ProbeRecord {
    pub status: WorkerStatus,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Whether the last attempt reached the worker.
    pub reached: bool,
    pub latency_ms: Option<u32>,
    pub error: Option<String>,
}

impl Store {
    /// Writes a probe's conclusion; when the status changes, the event is written in the
    /// same transaction.
    pub async fn record_probe(
        &self,
        worker: &Worker,
        record: &ProbeRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE workers SET status = ?, consecutive_failures = ?, consecutive_successes = ?, \
             last_checked = UTC_TIMESTAMP(6), \
             last_seen_alive = IF(?, UTC_TIMESTAMP(6), last_seen_alive), \
             probe_latency_ms = ?, last_probe_error = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE id = ?",
        )
        .bind(record.status)
        .bind(record.consecutive_failures)
        .bind(record.consecutive_successes)
        .bind(record.reached)
        .bind(record.latency_ms)
        .bind(&record.error)
        .bind(worker.id)
        .execute(&mut *tx)
        .await?;
        if record.status != worker.status {
            let msg = match &record.error {
                Some(e) if record.status == WorkerStatus::Dead => format!(
                    "{} -> dead after {} failed probes: {e}",
                    worker.status, record.consecutive_failures
                ),
                _ => format!("{} -> {}", worker.status, record.status),
            };
            let kind = format!("worker.{}", record.status);
            events::append_in(&mut tx, &kind, Some(&worker.name), None, &msg).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records, in one statement per thousand workers, the probes of a round that found
    /// alive workers alive: the time, the latency, one more success. A worker whose state
    /// changed since the round listed it (a watch-triggered probe saw a failure) is left
    /// as that probe recorded it.
    pub async fn record_routine_probes(&self, probes: &[(u64, u32)]) -> Result<(), StoreError> {
        for chunk in probes.chunks(1000) {
            let cases = " WHEN ? THEN ?".repeat(chunk.len());
            let ids = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "UPDATE workers SET consecutive_successes = LEAST(consecutive_successes + 1, 1000000), \
                 last_checked = UTC_TIMESTAMP(6), last_seen_alive = UTC_TIMESTAMP(6), \
                 probe_latency_ms = CASE id{cases} END, last_probe_error = NULL, \
                 updated_at = UTC_TIMESTAMP(6) \
                 WHERE id IN ({ids}) AND status = 'alive' AND consecutive_failures = 0"
            );
            let mut query = sqlx::query(&sql);
            for (id, latency) in chunk {
                query = query.bind(id).bind(latency);
            }
            for (id, _) in chunk {
                query = query.bind(id);
            }
            self.write(query).await?;
        }
        Ok(())
    }

    /// Records failed probes that have not (yet) made the worker dead.
    pub async fn record_failing(&self, worker: &Worker, failures: u32) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "UPDATE workers SET consecutive_failures = ?, consecutive_successes = 0, \
             last_checked = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
            )
            .bind(failures)
            .bind(worker.id),
        )
        .await?;
        Ok(())
    }
}
