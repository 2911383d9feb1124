//! Idempotency keys: which request a client's key stands for, and what it made.

use std::time::Duration;

use super::{Store, StoreError};

/// What a key stands for when a request with it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// First use: the request runs, making `resource_id`.
    New,
    /// The same request already succeeded and made this.
    Done { resource_id: String },
    /// The same request is running, or was cut short (its process died), for this long.
    Running { resource_id: String, for_: Duration },
    /// The key was used with another request.
    Mismatch,
}

impl Store {
    /// Records `key` for a request (of `hash`) that will make `resource_id`, or says what
    /// the key already stands for. One statement wins a race between two replicas: the
    /// key's primary key.
    pub async fn claim_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        hash: &str,
        resource_id: &str,
    ) -> Result<KeyClaim, StoreError> {
        let inserted = self
            .write(
                sqlx::query(
                    "INSERT IGNORE INTO idempotency_keys \
             (tenant, route, idem_key, request_hash, resource_id, created_at) \
             VALUES (?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
                )
                .bind(tenant)
                .bind(route)
                .bind(key)
                .bind(hash)
                .bind(resource_id),
            )
            .await?
            .rows_affected();
        if inserted == 1 {
            return Ok(KeyClaim::New);
        }
        let row: Option<(String, String, bool, i64)> = sqlx::query_as(
            "SELECT request_hash, resource_id, done_at IS NOT NULL, \
             TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(6)) \
             FROM idempotency_keys WHERE tenant = ? AND route = ? AND idem_key = ?",
        )
        .bind(tenant)
        .bind(route)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some((stored_hash, resource_id, done, micros)) = row else {
            // Purged between the two statements: the key is free again.
            return Box::pin(self.claim_idempotency_key(tenant, route, key, hash, resource_id))
                .await;
        };
        Ok(if stored_hash != hash {
            KeyClaim::Mismatch
        } else if done {
            KeyClaim::Done { resource_id }
        } else {
            KeyClaim::Running {
                resource_id,
                for_: Duration::from_micros(micros.max(0) as u64),
            }
        })
    }

    /// The request of `key` succeeded, making `resource_id` (a rent that had to try
    /// another worker made its rental under another id than the one it began with).
    pub async fn finish_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        resource_id: &str,
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "UPDATE idempotency_keys SET done_at = UTC_TIMESTAMP(6), resource_id = ? \
                 WHERE tenant = ? AND route = ? AND idem_key = ?",
            )
            .bind(resource_id)
            .bind(tenant)
            .bind(route)
            .bind(key),
        )
        .await?;
        Ok(())
    }

    /// The request of `key` failed: the key is free for a retry.
    pub async fn forget_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE tenant = ? AND route = ? AND idem_key = ?",
            )
            .bind(tenant)
            .bind(route)
            .bind(key),
        )
        .await?;
        Ok(())
    }

    /// A request of `key` was cut short (its process died) without making `old`: a new
    /// attempt takes the key over for `new`. False if another attempt took it first.
    pub async fn retake_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .write(
                sqlx::query(
                    "UPDATE idempotency_keys SET resource_id = ?, created_at = UTC_TIMESTAMP(6) \
             WHERE tenant = ? AND route = ? AND idem_key = ? AND resource_id = ? \
             AND done_at IS NULL",
                )
                .bind(new)
                .bind(tenant)
                .bind(route)
                .bind(key)
                .bind(old),
            )
            .await?
            .rows_affected()
            == 1)
    }

    /// Keys older than `age` go. Returns how many.
    pub async fn purge_idempotency_keys(&self, age: Duration) -> Result<u64, StoreError> {
        Ok(self
            .write(
                sqlx::query(
                    "DELETE FROM idempotency_keys \
             WHERE created_at < UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
                )
                .bind(age.as_secs()),
            )
            .await?
            .rows_affected())
    }
}
