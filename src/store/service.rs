//! A worker taken out of service and back by a decision rather than a fault: quarantine
//! (its host key changed) until the operator restores it, and drain (maintenance).

use super::{Store, StoreError, Worker, events};

impl Store {
    /// Takes a worker out of service until an operator says otherwise.
    pub async fn quarantine(&self, worker: &Worker, reason: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE workers SET quarantine_reason = ?, quarantined_at = UTC_TIMESTAMP(6), \
             updated_at = UTC_TIMESTAMP(6) WHERE id = ? AND quarantine_reason IS NULL",
        )
        .bind(reason)
        .bind(worker.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if changed {
            events::append_in(
                &mut tx,
                "worker.quarantined",
                Some(&worker.name),
                None,
                reason,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Returns a quarantined worker to service, with an event naming what it was
    /// quarantined for. With `forget_host_key`, the host key trusted on first use is
    /// forgotten too, and the next probe trusts the key the worker presents then (the
    /// operator's word that the new key is the worker's); a key pinned in the inventory is
    /// changed there instead. `None` if there is no such worker, `Some(false)` if it was
    /// not quarantined (nothing changed).
    pub async fn restore_worker(
        &self,
        name: &str,
        forget_host_key: bool,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let found: Option<(Option<String>,)> =
            sqlx::query_as("SELECT quarantine_reason FROM workers WHERE name = ? FOR UPDATE")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((reason,)) = found else {
            return Ok(None);
        };
        let Some(reason) = reason else {
            return Ok(Some(false));
        };
        sqlx::query(
            "UPDATE workers SET quarantine_reason = NULL, quarantined_at = NULL, \
             known_host_key = IF(?, NULL, known_host_key), \
             consecutive_failures = 0, consecutive_successes = 0, \
             updated_at = UTC_TIMESTAMP(6) WHERE name = ?",
        )
        .bind(forget_host_key)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let host_key = if forget_host_key {
            "; its host key will be trusted anew at the next probe"
        } else {
            ""
        };
        events::append_in(
            &mut tx,
            "worker.restored",
            Some(name),
            None,
            &format!("back in service by the operator (it was quarantined: {reason}){host_key}"),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// Puts a worker in or out of maintenance. False if there is no such worker.
    pub async fn set_drained(&self, name: &str, drained: bool) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let found: Option<bool> =
            sqlx::query_scalar("SELECT drained FROM workers WHERE name = ? FOR UPDATE")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(was) = found else {
            return Ok(false);
        };
        if was != drained {
            sqlx::query(
                "UPDATE workers SET drained = ?, updated_at = UTC_TIMESTAMP(6) WHERE name = ?",
            )
            .bind(drained)
            .bind(name)
            .execute(&mut *tx)
            .await?;
            let (kind, msg) = if drained {
                (
                    "worker.drained",
                    "drained: no new rentals, its tenants are moved away",
                )
            } else {
                ("worker.undrained", "back in service")
            };
            events::append_in(&mut tx, kind, Some(name), None, msg).await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
