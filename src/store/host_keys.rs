//! Workers' host keys as Orion knows them: a key trusted on first use, and the host
//! certificates Orion's CA signed (which workers need one, which keys are revoked).

use chrono::{DateTime, Utc};

use super::workers::WORKER_COLUMNS;
use super::{Store, StoreError, Worker, events};

impl Store {
    /// Records a host key trusted on first use. Returns false if another key was recorded
    /// meanwhile (the caller then treats the connection as a mismatch).
    pub async fn trust_host_key(&self, worker: &Worker, key: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE workers SET known_host_key = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE id = ? AND known_host_key IS NULL",
        )
        .bind(key)
        .bind(worker.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            let msg = format!("host key trusted on first use: {key}");
            events::append_in(
                &mut tx,
                "worker.host_key_trusted",
                Some(&worker.name),
                None,
                &msg,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Alive, trusted workers whose host certificate is missing, for another key, or
    /// ends before `until`.
    pub async fn workers_needing_host_cert(
        &self,
        until: DateTime<Utc>,
    ) -> Result<Vec<Worker>, StoreError> {
        let workers: Vec<Worker> = sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE {tended} \
             AND COALESCE(pinned_host_key, known_host_key) IS NOT NULL",
            tended = Worker::TENDED_SQL,
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(workers
            .into_iter()
            .filter(|w| !w.host_cert_current(until))
            .collect())
    }

    /// The keys Orion's CA certified on workers that must no longer be trusted
    /// (quarantined: the key may be in a stranger's hands; retired).
    pub async fn revoked_host_keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT host_cert_key FROM workers WHERE host_cert_key IS NOT NULL \
             AND {withdrawn} ORDER BY id",
            withdrawn = Worker::WITHDRAWN_SQL,
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// A certificate for `key` now sits on the worker, valid until `expires`.
    pub async fn record_host_cert(
        &self,
        worker: &Worker,
        key: &str,
        expires: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write(
            sqlx::query(
                "UPDATE workers SET host_cert_key = ?, host_cert_expires = ?, \
             updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
            )
            .bind(key)
            .bind(expires)
            .bind(worker.id),
        )
        .await?;
        Ok(())
    }
}
