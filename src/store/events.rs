//! The append-only events log: what happened, when, to which worker and rental.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, MySql, Transaction};

use super::{Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, utoipa::ToSchema)]
pub struct Event {
    pub id: u64,
    pub at: DateTime<Utc>,
    /// Dotted name: `worker.dead`, `rental.provisioned`, …
    pub kind: String,
    pub worker: Option<String>,
    pub rental_id: Option<String>,
    pub message: String,
}

/// Appends an event inside a transaction, so it is written if and only if the change it
/// describes is.
pub(super) async fn append_in(
    tx: &mut Transaction<'_, MySql>,
    kind: &str,
    worker: Option<&str>,
    rental_id: Option<&str>,
    message: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (at, kind, worker, rental_id, message) \
         VALUES (UTC_TIMESTAMP(6), ?, ?, ?, ?)",
    )
    .bind(kind)
    .bind(worker)
    .bind(rental_id)
    .bind(message)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Appends an event on its own (for facts that change no other row, such as a failed
    /// provisioning attempt).
    pub async fn append_event(
        &self,
        kind: &str,
        worker: Option<&str>,
        rental_id: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        append_in(&mut tx, kind, worker, rental_id, message).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Id of the newest event (0 when there is none).
    pub async fn last_event_id(&self) -> Result<u64, StoreError> {
        let id: Option<u64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(id.unwrap_or(0))
    }

    /// The latest `n` events, oldest first.
    pub async fn latest_events(&self, n: u32) -> Result<Vec<Event>, StoreError> {
        let after: Option<u64> = sqlx::query_scalar(
            "SELECT MIN(id) - 1 FROM (SELECT id FROM events ORDER BY id DESC LIMIT ?) AS latest",
        )
        .bind(n)
        .fetch_one(&self.pool)
        .await?;
        self.events_after(after.unwrap_or(0), n).await
    }

    /// Events with an id above `after`, oldest first, at most `limit`.
    pub async fn events_after(&self, after: u64, limit: u32) -> Result<Vec<Event>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, at, kind, worker, rental_id, message FROM events \
             WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
