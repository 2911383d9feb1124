//! Idempotency keys: which request a client's key stands for, and what it made.

use std::time::Duration;

use super::{Store, StoreError};

/// An `Idempotency-Key` held by the process running its request: what that request's
/// activation checks, so that a request whose key was taken over by a retry (its
/// process was thought gone) can never make a second live rental.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHold {
    pub tenant: String,
    pub route: &'static str,
    pub key: String,
    /// The process running the request (`Leadership::holder`).
    pub holder: String,
}

/// Whether the process still holds `hold`'s key, locking the key's row until the end of
/// `tx`: a retry cannot take it over between this check and the commit.
pub(super) async fn still_held(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    hold: &KeyHold,
) -> Result<bool, StoreError> {
    let holder: Option<Option<String>> = sqlx::query_scalar(
        "SELECT holder FROM idempotency_keys WHERE tenant = ? AND route = ? AND idem_key = ? \
         FOR UPDATE",
    )
    .bind(&hold.tenant)
    .bind(hold.route)
    .bind(&hold.key)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(holder.flatten().as_deref() == Some(hold.holder.as_str()))
}

/// What a key stands for when a request with it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// First use: the request runs, making `resource_id`.
    New,
    /// The same request already succeeded and made this.
    Done { resource_id: String },
    /// The same request is running, or was cut short (its process died), for this long.
    /// `orphaned`: the process that runs it has stopped saying it is alive.
    Running {
        resource_id: String,
        for_: Duration,
        orphaned: bool,
    },
    /// The key was used with another request.
    Mismatch,
}

impl Store {
    /// Records `key` for a request (of `hash`) that will make `resource_id`, or says what
    /// the key already stands for. One statement wins a race between two replicas: the
    /// key's primary key.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        hash: &str,
        resource_id: &str,
        holder: &str,
        silent: Duration,
    ) -> Result<KeyClaim, StoreError> {
        let inserted = self
            .write(
                sqlx::query(
                    "INSERT IGNORE INTO idempotency_keys \
             (tenant, route, idem_key, request_hash, resource_id, holder, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
                )
                .bind(tenant)
                .bind(route)
                .bind(key)
                .bind(hash)
                .bind(resource_id)
                .bind(holder),
            )
            .await?
            .rows_affected();
        if inserted == 1 {
            return Ok(KeyClaim::New);
        }
        // Orphaned: its process is known and has not been seen for `silent` (a process
        // never seen counts as gone too).
        let row: Option<(String, String, bool, i64, bool)> = sqlx::query_as(
            "SELECT k.request_hash, k.resource_id, k.done_at IS NOT NULL, \
             TIMESTAMPDIFF(MICROSECOND, k.created_at, UTC_TIMESTAMP(6)), \
             k.holder IS NOT NULL AND NOT EXISTS (SELECT 1 FROM replicas r \
               WHERE r.holder = k.holder \
               AND r.seen_at > UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND) \
             FROM idempotency_keys k WHERE k.tenant = ? AND k.route = ? AND k.idem_key = ?",
        )
        .bind(silent.as_micros() as u64)
        .bind(tenant)
        .bind(route)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some((stored_hash, resource_id, done, micros, orphaned)) = row else {
            // Purged between the two statements: the key is free again.
            return Box::pin(self.claim_idempotency_key(
                tenant,
                route,
                key,
                hash,
                resource_id,
                holder,
                silent,
            ))
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
                orphaned,
            }
        })
    }

    /// The request of `key` that began for `began` succeeded, making `resource_id` (a
    /// rent that had to try another worker made its rental under another id than the
    /// one it began with). Nothing happens if another attempt took the key over.
    pub async fn finish_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        began: &str,
        resource_id: &str,
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "UPDATE idempotency_keys SET done_at = UTC_TIMESTAMP(6), resource_id = ? \
                 WHERE tenant = ? AND route = ? AND idem_key = ? AND resource_id = ?",
            )
            .bind(resource_id)
            .bind(tenant)
            .bind(route)
            .bind(key)
            .bind(began),
        )
        .await?;
        Ok(())
    }

    /// The request of `key` that began for `began` failed: the key is free for a retry.
    /// Nothing happens if another attempt took the key over meanwhile.
    pub async fn forget_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        began: &str,
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE tenant = ? AND route = ? AND idem_key = ? \
                 AND resource_id = ? AND done_at IS NULL",
            )
            .bind(tenant)
            .bind(route)
            .bind(key)
            .bind(began),
        )
        .await?;
        Ok(())
    }

    /// A request of `key` was cut short (its process died) without making `old`: a new
    /// attempt, run by `holder`, takes the key over for `new`. False if another attempt
    /// took it first.
    #[allow(clippy::too_many_arguments)]
    pub async fn retake_idempotency_key(
        &self,
        tenant: &str,
        route: &str,
        key: &str,
        old: &str,
        new: &str,
        holder: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .write(
                sqlx::query(
                    "UPDATE idempotency_keys SET resource_id = ?, holder = ?, \
             created_at = UTC_TIMESTAMP(6) \
             WHERE tenant = ? AND route = ? AND idem_key = ? AND resource_id = ? \
             AND done_at IS NULL",
                )
                .bind(new)
                .bind(holder)
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
