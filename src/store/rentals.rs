//! Rentals and their placements (the workers they have lived on).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::mysql::MySqlRow;
use sqlx::{MySql, Row, Transaction};

use super::workers::{WORKER_COLUMNS, Worker, release_placement};
use super::{Store, StoreError, events, is_retryable};
use crate::model::{PlacementState, RentalStatus};

/// What a new rental is made of, validated, before a worker is claimed for it.
#[derive(Debug, Clone)]
pub struct NewRental {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub public_key: Option<String>,
    pub password_hash: Option<String>,
}

/// A rental row. The password hash is kept for provisioning and never serialised.
#[derive(Debug, Clone)]
pub struct RentalRecord {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub public_key: Option<String>,
    pub password_hash: Option<String>,
    pub status: RentalStatus,
    pub worker_id: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

const RENTAL_COLUMNS: &str = "id, tenant, username, public_key, password_hash, status, \
    worker_id, created_at, updated_at, ended_at";

impl RentalRecord {
    fn from_row(row: &MySqlRow) -> Result<Self, sqlx::Error> {
        let status: String = row.try_get("status")?;
        Ok(Self {
            id: row.try_get("id")?,
            tenant: row.try_get("tenant")?,
            username: row.try_get("username")?,
            public_key: row.try_get("public_key")?,
            password_hash: row.try_get("password_hash")?,
            status: status
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            worker_id: row.try_get("worker_id")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            ended_at: row.try_get("ended_at")?,
        })
    }
}

/// One stay of a rental on a worker.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementRecord {
    pub worker: String,
    pub state: PlacementState,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// A rental as a client sees it: where it lives now and where it has lived.
#[derive(Debug, Clone, Serialize)]
pub struct RentalView {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub status: RentalStatus,
    pub worker: Option<String>,
    pub site: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub auth: Vec<&'static str>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub placements: Vec<PlacementRecord>,
}

/// How many times a transaction that lost a deadlock is tried again.
const DEADLOCK_RETRIES: usize = 5;

impl Store {
    /// Claims one alive, free, trusted worker for a new rental and records the rental and
    /// its placement, all in one transaction: two concurrent calls never get the same
    /// worker. `None` when no worker is free.
    pub async fn claim_worker_for(
        &self,
        rental: &NewRental,
    ) -> Result<Option<(RentalRecord, Worker)>, StoreError> {
        let mut attempt = 0;
        loop {
            match self.try_claim(rental).await {
                Err(StoreError::Unavailable(e)) | Err(StoreError::Query(e))
                    if is_retryable(&e) && attempt < DEADLOCK_RETRIES =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "claim lost a deadlock, trying again");
                }
                other => return other,
            }
        }
    }

    async fn try_claim(
        &self,
        rental: &NewRental,
    ) -> Result<Option<(RentalRecord, Worker)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE workers SET rental_id = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE rental_id IS NULL AND status = 'alive' AND quarantine_reason IS NULL \
             AND retired = FALSE ORDER BY probe_latency_ms, name LIMIT 1",
        )
        .bind(&rental.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let worker = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE rental_id = ?"
        ))
        .bind(&rental.id)
        .try_map(|r: MySqlRow| Worker::from_row(&r))
        .fetch_one(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO rentals (id, tenant, username, public_key, password_hash, status, \
             worker_id, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, 'provisioning', ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        )
        .bind(&rental.id)
        .bind(&rental.tenant)
        .bind(&rental.username)
        .bind(&rental.public_key)
        .bind(&rental.password_hash)
        .bind(worker.id)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            tx.rollback().await?;
            return Err(StoreError::UsernameTaken(rental.username.clone()));
        }
        inserted?;
        sqlx::query(
            "INSERT INTO placements (rental_id, worker_id, state, started_at) \
             VALUES (?, ?, 'provisioning', UTC_TIMESTAMP(6))",
        )
        .bind(&rental.id)
        .bind(worker.id)
        .execute(&mut *tx)
        .await?;
        let record = fetch_rental(&mut tx, &rental.id)
            .await?
            .expect("the rental was inserted in this transaction");
        tx.commit().await?;
        Ok(Some((record, worker)))
    }

    /// The tenant's account exists on `worker`: the rental and its placement are active.
    pub async fn activate(&self, rental_id: &str, worker: &Worker) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE rentals SET status = 'active', worker_id = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE id = ?",
        )
        .bind(worker.id)
        .bind(rental_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE placements SET state = 'active' \
             WHERE rental_id = ? AND worker_id = ? AND state = 'provisioning'",
        )
        .bind(rental_id)
        .bind(worker.id)
        .execute(&mut *tx)
        .await?;
        let msg = format!("provisioned on {}", worker.name);
        events::append_in(
            &mut tx,
            "rental.provisioned",
            Some(&worker.name),
            Some(rental_id),
            &msg,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Provisioning failed at rent time. The rental is over; the worker is freed if the
    /// half-made account was removed, else it stays held until the cleanup loop removes it.
    pub async fn fail_rent(
        &self,
        rental_id: &str,
        worker: &Worker,
        account_removed: bool,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE rentals SET status = 'failed', worker_id = NULL, \
             updated_at = UTC_TIMESTAMP(6), ended_at = UTC_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(rental_id)
        .execute(&mut *tx)
        .await?;
        end_placement(&mut tx, rental_id, worker.id, account_removed).await?;
        events::append_in(
            &mut tx,
            "rental.failed",
            Some(&worker.name),
            Some(rental_id),
            reason,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a rental as being released and returns it with its current worker.
    /// Returns the rental unchanged if it is not in a state that can be released.
    pub async fn begin_release(
        &self,
        rental_id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<(RentalRecord, Option<Worker>)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(rental) = fetch_rental_for_update(&mut tx, rental_id).await? else {
            return Ok(None);
        };
        if tenant.is_some_and(|t| t != rental.tenant) {
            return Ok(None);
        }
        let mut rental = rental;
        if rental.status == RentalStatus::Active {
            sqlx::query(
                "UPDATE rentals SET status = 'releasing', updated_at = UTC_TIMESTAMP(6) \
                 WHERE id = ?",
            )
            .bind(rental_id)
            .execute(&mut *tx)
            .await?;
            rental.status = RentalStatus::Releasing;
        }
        let worker = match rental.worker_id {
            Some(id) => {
                sqlx::query(&format!(
                    "SELECT {WORKER_COLUMNS} FROM workers WHERE id = ?"
                ))
                .bind(id)
                .try_map(|r: MySqlRow| Worker::from_row(&r))
                .fetch_optional(&mut *tx)
                .await?
            }
            None => None,
        };
        tx.commit().await?;
        Ok(Some((rental, worker)))
    }

    /// The rental is over. If its account could not be removed from the worker (the
    /// worker is down), the placement stays stale and the cleanup loop finishes the job.
    pub async fn finish_release(
        &self,
        rental_id: &str,
        worker: Option<&Worker>,
        account_removed: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE rentals SET status = 'released', worker_id = NULL, \
             updated_at = UTC_TIMESTAMP(6), ended_at = UTC_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(rental_id)
        .execute(&mut *tx)
        .await?;
        let msg = match worker {
            Some(w) => {
                end_placement(&mut tx, rental_id, w.id, account_removed).await?;
                if account_removed {
                    format!("released; account removed from {}", w.name)
                } else {
                    format!(
                        "released; {} is unreachable, its account will be removed when it answers",
                        w.name
                    )
                }
            }
            None => "released".to_owned(),
        };
        events::append_in(
            &mut tx,
            "rental.released",
            worker.map(|w| w.name.as_str()),
            Some(rental_id),
            &msg,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn rental(&self, id: &str) -> Result<Option<RentalRecord>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ?"
        ))
        .bind(id)
        .try_map(|r: MySqlRow| RentalRecord::from_row(&r))
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Rentals left in `provisioning` by a process that stopped mid-rent.
    pub async fn rentals_in(&self, status: RentalStatus) -> Result<Vec<RentalRecord>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals WHERE status = ? ORDER BY created_at"
        ))
        .bind(status.as_str())
        .try_map(|r: MySqlRow| RentalRecord::from_row(&r))
        .fetch_all(&self.pool)
        .await?)
    }

    /// A rental with its current worker and placement history, as the API shows it.
    pub async fn rental_view(&self, id: &str) -> Result<Option<RentalView>, StoreError> {
        let Some(r) = self.rental(id).await? else {
            return Ok(None);
        };
        let worker = match r.worker_id {
            Some(wid) => {
                sqlx::query(&format!(
                    "SELECT {WORKER_COLUMNS} FROM workers WHERE id = ?"
                ))
                .bind(wid)
                .try_map(|row: MySqlRow| Worker::from_row(&row))
                .fetch_optional(&self.pool)
                .await?
            }
            None => None,
        };
        let placements = sqlx::query(
            "SELECT w.name, p.state, p.started_at, p.ended_at FROM placements p \
             JOIN workers w ON w.id = p.worker_id WHERE p.rental_id = ? ORDER BY p.id",
        )
        .bind(id)
        .try_map(|row: MySqlRow| {
            let state: String = row.try_get("state")?;
            Ok(PlacementRecord {
                worker: row.try_get("name")?,
                state: state
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                started_at: row.try_get("started_at")?,
                ended_at: row.try_get("ended_at")?,
            })
        })
        .fetch_all(&self.pool)
        .await?;
        let mut auth = Vec::new();
        if r.public_key.is_some() {
            auth.push("publickey");
        }
        if r.password_hash.is_some() {
            auth.push("password");
        }
        Ok(Some(RentalView {
            id: r.id,
            tenant: r.tenant,
            username: r.username,
            status: r.status,
            worker: worker.as_ref().map(|w| w.name.clone()),
            site: worker.as_ref().map(|w| w.site.clone()),
            host: worker.as_ref().map(|w| w.public_host.clone()),
            port: worker.as_ref().map(|w| w.public_port),
            auth,
            created_at: r.created_at,
            updated_at: r.updated_at,
            ended_at: r.ended_at,
            placements,
        }))
    }
}

async fn fetch_rental(
    tx: &mut Transaction<'_, MySql>,
    id: &str,
) -> Result<Option<RentalRecord>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ?"
    ))
    .bind(id)
    .try_map(|r: MySqlRow| RentalRecord::from_row(&r))
    .fetch_optional(&mut **tx)
    .await
}

async fn fetch_rental_for_update(
    tx: &mut Transaction<'_, MySql>,
    id: &str,
) -> Result<Option<RentalRecord>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ? FOR UPDATE"
    ))
    .bind(id)
    .try_map(|r: MySqlRow| RentalRecord::from_row(&r))
    .fetch_optional(&mut **tx)
    .await
}

/// Ends the rental's live placement on a worker: released (and the worker freed) when its
/// account is gone, stale when the account may still be there.
async fn end_placement(
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
        sqlx::query(
            "UPDATE placements SET state = 'stale', ended_at = UTC_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(placement_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
