//! Rentals and their placements (the workers they have lived on).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, MySql, Transaction};

use super::claims::{Constraints, claim_free_worker};
use super::endpoints::claim_endpoint;
use super::placements::{
    PlacementRecord, end_placement, insert_placement, live_uid, placements_of, stale_live_placement,
};
use super::workers::{WORKER_COLUMNS, Worker, fetch_worker};
use super::{Store, StoreError, events, retry_on_conflict};
use crate::model::RentalStatus;

/// What a new rental is made of, validated, before a worker is claimed for it.
#[derive(Debug, Clone)]
pub struct NewRental {
    pub id: String,
    pub tenant: String,
    /// The token the rental was made with (`None` for the admin token).
    pub token_id: Option<String>,
    pub username: String,
    pub public_key: Option<String>,
    pub password_hash: Option<String>,
    pub notify_url: Option<String>,
    /// How long the rental lives before it is released by itself (`None`: until released).
    pub ttl: Option<std::time::Duration>,
    /// Most live rentals the tenant may hold, this one included (`None`: no limit).
    pub max_rentals: Option<u32>,
    /// The gateway's ports, one of which the rental is given (`None`: no gateway).
    pub endpoint_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Where it may be placed.
    pub constraints: Constraints,
}

/// A worker claimed for a rental, and the uid its account gets there.
#[derive(Debug, Clone)]
pub struct Claim {
    pub worker: Worker,
    /// Orion's own uid for the account on this worker, never handed to anyone else.
    pub uid: u32,
}

/// A rental row. The password hash is kept for provisioning and never shown.
#[derive(Debug, Clone, FromRow)]
pub struct RentalRecord {
    pub id: String,
    pub tenant: String,
    pub token_id: Option<String>,
    pub username: String,
    pub public_key: Option<String>,
    pub password_hash: Option<String>,
    pub notify_url: Option<String>,
    pub status: RentalStatus,
    pub worker_id: Option<u64>,
    /// Its port on the gateway, for its whole life (`None`: no gateway, or none free).
    pub endpoint_port: Option<u16>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The site it was rented on (a hard constraint at rent; its moves prefer the site
    /// it lives in, and leave it when the site has no worker left).
    pub want_site: Option<String>,
    /// Labels its workers must carry, at rent and at every move (a JSON object).
    pub want_labels: Option<String>,
    /// The site it asked to be placed on first.
    pub prefer_site: Option<String>,
}

impl RentalRecord {
    /// The labels it asked for.
    pub fn labels(&self) -> crate::inventory::Labels {
        self.want_labels
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default()
    }
}

const RENTAL_COLUMNS: &str = "id, tenant, token_id, username, public_key, password_hash, \
    notify_url, status, worker_id, endpoint_port, created_at, updated_at, ended_at, expires_at, \
    want_site, want_labels, prefer_site";

/// A rental with its current worker and the workers it has lived on, for the API to show.
#[derive(Debug, Clone)]
pub struct RentalDetail {
    pub rental: RentalRecord,
    /// The worker serving it now (`None` while waiting, and once over).
    pub worker: Option<Worker>,
    /// Oldest first.
    pub placements: Vec<PlacementRecord>,
    /// Its home's last complete snapshot.
    pub snapshot: Option<super::SnapshotInfo>,
}

impl Store {
    /// Claims one alive, free, trusted worker (not one of `exclude`) for a new rental and
    /// records the rental and its placement, all in one transaction: two concurrent calls
    /// never get the same worker, and a tenant never holds more than `max_rentals` live
    /// rentals. The placement's account gets uid `uid_min` + the placement's id. `None`
    /// when no worker is free.
    pub async fn claim_worker_for(
        &self,
        rental: &NewRental,
        uid_min: u32,
        exclude: &[u64],
    ) -> Result<Option<(RentalRecord, Claim)>, StoreError> {
        retry_on_conflict(|| self.try_claim(rental, uid_min, exclude)).await
    }

    async fn try_claim(
        &self,
        rental: &NewRental,
        uid_min: u32,
        exclude: &[u64],
    ) -> Result<Option<(RentalRecord, Claim)>, StoreError> {
        let mut tx = self.begin().await?;
        if let Some(limit) = rental.max_rentals {
            // The tenant's row lock: concurrent rents of one tenant count one at a time.
            super::lock_tenant(&mut tx, &rental.tenant).await?;
            let live: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM rentals WHERE tenant = ? \
                 AND status NOT IN ('released', 'failed')",
            )
            .bind(&rental.tenant)
            .fetch_one(&mut *tx)
            .await?;
            if live >= i64::from(limit) {
                tx.rollback().await?;
                return Err(StoreError::QuotaExceeded { limit });
            }
        }
        let Some(worker) =
            claim_free_worker(&mut tx, &rental.id, exclude, &rental.constraints).await?
        else {
            tx.rollback().await?;
            return Ok(None);
        };
        let endpoint_port = match &rental.endpoint_ports {
            Some(ports) => {
                let port = claim_endpoint(&mut tx, &rental.id, ports).await?;
                if port.is_none() {
                    tracing::warn!(rental_id = %rental.id,
                        "every gateway port is taken: the rental has no endpoint (widen gateway.ports)");
                }
                port
            }
            None => None,
        };
        let ttl_micros = rental.ttl.map(|t| t.as_micros() as u64);
        let inserted = sqlx::query(
            "INSERT INTO rentals (id, tenant, token_id, username, public_key, password_hash, \
             notify_url, status, worker_id, endpoint_port, created_at, updated_at, expires_at, \
             want_site, want_labels, prefer_site) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 'provisioning', ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), \
             IF(? IS NULL, NULL, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND), ?, ?, ?)",
        )
        .bind(&rental.id)
        .bind(&rental.tenant)
        .bind(&rental.token_id)
        .bind(&rental.username)
        .bind(&rental.public_key)
        .bind(&rental.password_hash)
        .bind(&rental.notify_url)
        .bind(worker.id)
        .bind(endpoint_port)
        .bind(ttl_micros)
        .bind(ttl_micros)
        .bind(&rental.constraints.site)
        .bind(
            (!rental.constraints.labels.is_empty())
                .then(|| serde_json::to_string(&rental.constraints.labels).expect("strings")),
        )
        .bind(&rental.constraints.prefer_site)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            tx.rollback().await?;
            return Err(StoreError::UsernameTaken(rental.username.clone()));
        }
        inserted?;
        let uid = insert_placement(&mut tx, &rental.id, worker.id, uid_min).await?;
        let record = fetch_rental(&mut tx, &rental.id)
            .await?
            .ok_or_else(|| StoreError::Invariant("the rental inserted is not there".into()))?;
        tx.commit().await?;
        Ok(Some((record, Claim { worker, uid })))
    }

    /// The tenant's account exists on `worker`: the rental and its placement are active.
    /// `from` is the state the rental must still be in (`provisioning` after a rent,
    /// `migrating` after a move); returns false, changing nothing, if it no longer is
    /// (released meanwhile), and the caller must remove the account it just made.
    pub async fn activate(
        &self,
        rental_id: &str,
        worker: &Worker,
        from: RentalStatus,
        key: Option<&super::KeyHold>,
    ) -> Result<bool, StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            // A keyed rent whose key a retry took over (its process was thought gone)
            // does not come to life beside the retry's rental.
            if let Some(hold) = key
                && !super::idempotency::still_held(&mut tx, hold).await?
            {
                tx.rollback().await?;
                return Ok(false);
            }
            let updated = sqlx::query(
                "UPDATE rentals SET status = 'active', updated_at = UTC_TIMESTAMP(6) \
                 WHERE id = ? AND status = ? AND worker_id = ?",
            )
            .bind(rental_id)
            .bind(from)
            .bind(worker.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            sqlx::query(
                "UPDATE placements SET state = 'active' \
                 WHERE rental_id = ? AND worker_id = ? AND state = 'provisioning'",
            )
            .bind(rental_id)
            .bind(worker.id)
            .execute(&mut *tx)
            .await?;
            let (kind, msg) = if from == RentalStatus::Migrating {
                ("rental.migrated", format!("now active on {}", worker.name))
            } else {
                (
                    "rental.provisioned",
                    format!("provisioned on {}", worker.name),
                )
            };
            events::append_in(&mut tx, kind, Some(&worker.name), Some(rental_id), &msg).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// Rentals that must move: active on a worker that is dead, quarantined or retired;
    /// waiting for a worker; or caught mid-move by a crash.
    pub async fn rentals_to_migrate(&self) -> Result<Vec<RentalRecord>, StoreError> {
        // A worker that can never again be usable (`unknown` is only a new worker's status,
        // never one a rental was placed on) is dead, quarantined, retired or drained:
        // [`Worker::must_leave`].
        Ok(sqlx::query_as(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals \
             WHERE status IN ('waiting', 'migrating') \
             OR (status = 'active' AND (worker_id IS NULL \
                 OR worker_id NOT IN (SELECT id FROM workers WHERE {usable}))) \
             ORDER BY created_at",
            usable = Worker::USABLE_SQL,
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// First step of a move, recorded before anything runs on a worker: the rental's
    /// current placement becomes stale (its account is removed when that worker answers
    /// again), and a new worker is claimed and recorded as `migrating`. With no worker
    /// free the rental is `waiting`. Returns the new worker, or `None` if the rental is
    /// waiting or no longer needs to move.
    pub async fn begin_migration(
        &self,
        rental_id: &str,
        uid_min: u32,
    ) -> Result<Option<Claim>, StoreError> {
        retry_on_conflict(|| self.try_begin_migration(rental_id, uid_min)).await
    }

    async fn try_begin_migration(
        &self,
        rental_id: &str,
        uid_min: u32,
    ) -> Result<Option<Claim>, StoreError> {
        let mut tx = self.begin().await?;
        let Some(rental) = fetch_rental_for_update(&mut tx, rental_id).await? else {
            return Ok(None);
        };
        let current = fetch_worker(&mut *tx, rental.worker_id).await?;
        if rental.status == RentalStatus::Migrating
            && let Some(w) = current.as_ref().filter(|w| w.is_usable())
            && let Some(uid) = live_uid(&mut *tx, rental_id, w.id).await?
        {
            // A move interrupted after its claim: resume it on the worker it claimed, with
            // the uid it was given there.
            let worker = w.clone();
            tx.commit().await?;
            return Ok(Some(Claim { worker, uid }));
        }
        let must_move = match rental.status {
            // A move not resumed above starts again (its placement predates uids).
            RentalStatus::Waiting | RentalStatus::Migrating => true,
            RentalStatus::Active => current.as_ref().is_none_or(Worker::must_leave),
            _ => false,
        };
        if !must_move {
            return Ok(None);
        }
        // A move keeps the labels asked for, and stays in the site the rental lives in
        // when it can.
        let home = match &current {
            Some(w) => Some(w.site.clone()),
            None => last_site(&mut tx, rental_id).await?,
        };
        let constraints = Constraints {
            site: None,
            labels: rental.labels(),
            prefer_site: home.clone().or_else(|| rental.want_site.clone()),
        };
        let claimed = claim_free_worker(&mut tx, rental_id, &[], &constraints).await?;
        if claimed.is_none()
            && rental.status == RentalStatus::Active
            && current.as_ref().is_some_and(Worker::answers)
        {
            // A planned move (drained, retired) with nowhere to go: the tenant stays
            // where it is, still served, until a worker frees up.
            tx.rollback().await?;
            return Ok(None);
        }
        if let Some(old) = &current {
            stale_live_placement(&mut tx, rental_id, old.id).await?;
        }
        let mut uid = None;
        match &claimed {
            Some(new) => {
                sqlx::query(
                    "UPDATE rentals SET status = 'migrating', worker_id = ?, \
                     updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
                )
                .bind(new.id)
                .bind(rental_id)
                .execute(&mut *tx)
                .await?;
                uid = Some(insert_placement(&mut tx, rental_id, new.id, uid_min).await?);
                let mut msg = match &current {
                    Some(old) => format!(
                        "moving from {} ({}) to {}",
                        old.name,
                        old.why_leaving(),
                        new.name
                    ),
                    None => format!("moving to {}", new.name),
                };
                if let Some(home) = home.as_deref().filter(|h| *h != new.site) {
                    msg.push_str(&format!(
                        ": site {home} has no usable free worker left, the rental leaves it for site {}",
                        new.site
                    ));
                }
                events::append_in(
                    &mut tx,
                    "rental.migrating",
                    Some(&new.name),
                    Some(rental_id),
                    &msg,
                )
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE rentals SET status = 'waiting', worker_id = NULL, \
                     updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
                )
                .bind(rental_id)
                .execute(&mut *tx)
                .await?;
                if rental.status != RentalStatus::Waiting {
                    let msg = match &current {
                        Some(old) => format!(
                            "{} is {}; no free worker to move to, waiting for one",
                            old.name,
                            old.why_leaving()
                        ),
                        None => "no free worker to move to, waiting for one".to_owned(),
                    };
                    events::append_in(
                        &mut tx,
                        "rental.waiting",
                        current.as_ref().map(|w| w.name.as_str()),
                        Some(rental_id),
                        &msg,
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(claimed.zip(uid).map(|(worker, uid)| Claim { worker, uid }))
    }

    /// Where a rental in the middle of a move comes from: the worker of its latest stale
    /// placement other than the one it moves to, and its uid there.
    pub async fn moving_from(&self, rental_id: &str) -> Result<Option<(Worker, u32)>, StoreError> {
        let row: Option<(u64, u32)> = sqlx::query_as(
            "SELECT p.worker_id, p.uid FROM placements p JOIN rentals r ON r.id = p.rental_id \
             WHERE p.rental_id = ? AND p.state = 'stale' AND p.uid IS NOT NULL \
             AND p.worker_id <> COALESCE(r.worker_id, 0) ORDER BY p.id DESC LIMIT 1",
        )
        .bind(rental_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((worker_id, uid)) = row else {
            return Ok(None);
        };
        Ok(fetch_worker(&self.pool, Some(worker_id))
            .await?
            .map(|w| (w, uid)))
    }

    /// A move failed on the new worker: its placement becomes stale (the cleanup loop
    /// removes whatever was made) and the rental waits for the next pass.
    pub async fn abort_migration(
        &self,
        rental_id: &str,
        worker: &Worker,
        reason: &str,
    ) -> Result<(), StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            stale_live_placement(&mut tx, rental_id, worker.id).await?;
            sqlx::query(
                "UPDATE rentals SET status = 'waiting', worker_id = NULL, \
                 updated_at = UTC_TIMESTAMP(6) WHERE id = ? AND status = 'migrating'",
            )
            .bind(rental_id)
            .execute(&mut *tx)
            .await?;
            events::append_in(
                &mut tx,
                "rental.migration_failed",
                Some(&worker.name),
                Some(rental_id),
                reason,
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// An account was made on `worker` for a rental that was released meanwhile: the
    /// placement becomes stale so the cleanup loop removes the account.
    pub async fn orphan_placement(
        &self,
        rental_id: &str,
        worker: &Worker,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        stale_live_placement(&mut tx, rental_id, worker.id).await?;
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
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            fail_in(&mut tx, rental_id, worker, account_removed, reason).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Fails a rental still being provisioned by a request whose process stopped (a
    /// client retries it under its Idempotency-Key): whatever it made can then never
    /// become active beside the retry's. Its account, if any, is left for the cleanup
    /// loop to remove. False if the rental is no longer provisioning (it became active
    /// meanwhile, or was already ended).
    pub async fn abandon_rent(&self, rental_id: &str, reason: &str) -> Result<bool, StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            let rental = fetch_rental_for_update(&mut tx, rental_id).await?;
            let Some(RentalRecord {
                status: RentalStatus::Provisioning,
                worker_id: Some(worker_id),
                ..
            }) = rental
            else {
                tx.rollback().await?;
                return Ok(rental.is_none());
            };
            let worker = fetch_worker(&mut *tx, Some(worker_id))
                .await?
                .ok_or_else(|| StoreError::Invariant(format!("worker {worker_id} is gone")))?;
            fail_in(&mut tx, rental_id, &worker, false, reason).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// Marks a rental as being released and returns it with its current worker.
    /// Returns the rental unchanged if it is not in a state that can be released.
    pub async fn begin_release(
        &self,
        rental_id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<(RentalRecord, Option<Worker>)>, StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            let Some(rental) = fetch_rental_for_update(&mut tx, rental_id).await? else {
                return Ok(None);
            };
            if tenant.is_some_and(|t| t != rental.tenant) {
                return Ok(None);
            }
            let mut rental = rental;
            if matches!(rental.status, RentalStatus::Active | RentalStatus::Waiting) {
                sqlx::query(
                    "UPDATE rentals SET status = 'releasing', updated_at = UTC_TIMESTAMP(6) \
                     WHERE id = ?",
                )
                .bind(rental_id)
                .execute(&mut *tx)
                .await?;
                rental.status = RentalStatus::Releasing;
            }
            let worker = fetch_worker(&mut *tx, rental.worker_id).await?;
            tx.commit().await?;
            Ok(Some((rental, worker)))
        })
        .await
    }

    /// The rental is over. If its account could not be removed from the worker (the
    /// worker is down), the placement stays stale and the cleanup loop finishes the job.
    pub async fn finish_release(
        &self,
        rental_id: &str,
        worker: Option<&Worker>,
        account_removed: bool,
    ) -> Result<(), StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            sqlx::query(
                "UPDATE rentals SET status = 'released', worker_id = NULL, \
                 updated_at = UTC_TIMESTAMP(6), ended_at = UTC_TIMESTAMP(6) WHERE id = ?",
            )
            .bind(rental_id)
            .execute(&mut *tx)
            .await?;
            // Its home's snapshots go with it (deleted by the next purge).
            sqlx::query("UPDATE snapshots SET obsolete = TRUE WHERE rental_id = ?")
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
        })
        .await
    }

    /// The uid of the rental's live placement on `worker_id`, if it has one.
    pub async fn live_uid(
        &self,
        rental_id: &str,
        worker_id: u64,
    ) -> Result<Option<u32>, StoreError> {
        Ok(live_uid(&self.pool, rental_id, worker_id).await?)
    }

    /// Rentals still in `status` (`provisioning`, `releasing`) though nothing has touched
    /// them for `after`: the process making or releasing them lost its database midway
    /// (its client got an error), or died.
    pub async fn stuck_in(
        &self,
        status: RentalStatus,
        after: std::time::Duration,
    ) -> Result<Vec<RentalRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals WHERE status = ? \
             AND updated_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND ORDER BY created_at"
        ))
        .bind(status)
        .bind(after.as_micros() as u64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Live rentals whose time is up.
    pub async fn expired_rentals(&self) -> Result<Vec<RentalRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals \
             WHERE status IN ('active', 'waiting', 'migrating') \
             AND expires_at <= UTC_TIMESTAMP(6) ORDER BY expires_at"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Gives a live rental `ttl` more from now. `None` if there is no such live rental
    /// (or it is another tenant's, when `tenant` is given).
    pub async fn renew(
        &self,
        rental_id: &str,
        tenant: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<Option<()>, StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
            let Some(rental) = fetch_rental_for_update(&mut tx, rental_id).await? else {
                return Ok(None);
            };
            if tenant.is_some_and(|t| t != rental.tenant)
                || matches!(
                    rental.status,
                    RentalStatus::Releasing | RentalStatus::Released | RentalStatus::Failed
                )
            {
                return Ok(None);
            }
            sqlx::query(
                "UPDATE rentals SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                 updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
            )
            .bind(ttl.as_micros() as u64)
            .bind(rental_id)
            .execute(&mut *tx)
            .await?;
            events::append_in(
                &mut tx,
                "rental.renewed",
                None,
                Some(rental_id),
                &format!("expires in {}", humantime::format_duration(ttl)),
            )
            .await?;
            tx.commit().await?;
            Ok(Some(()))
        })
        .await
    }

    /// Ends the time of every live rental made with a token (they are released as
    /// expired). Returns how many.
    pub async fn expire_rentals_of_token(&self, token_id: &str) -> Result<u64, StoreError> {
        Ok(self.write(sqlx::query(
            "UPDATE rentals SET expires_at = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6) \
             WHERE token_id = ? AND status NOT IN ('released', 'failed', 'releasing')",
        )
        .bind(token_id)
        )
        .await?
        .rows_affected())
    }

    pub async fn rental(&self, id: &str) -> Result<Option<RentalRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Rentals by status (for the metrics).
    pub async fn rental_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM rentals GROUP BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// A rental with its current worker and placement history, for the API to show.
    pub async fn rental_detail(&self, id: &str) -> Result<Option<RentalDetail>, StoreError> {
        let Some(rental) = self.rental(id).await? else {
            return Ok(None);
        };
        Ok(self.details_of(vec![rental]).await?.pop())
    }

    /// Every rental that is not over, with its current worker and placement history: by
    /// status (provisioning, active, migrating, waiting, releasing), oldest first in each.
    /// Three statements, however many rentals there are.
    pub async fn live_rental_details(&self) -> Result<Vec<RentalDetail>, StoreError> {
        let rentals: Vec<RentalRecord> = sqlx::query_as(&format!(
            "SELECT {RENTAL_COLUMNS} FROM rentals \
             WHERE status IN ('provisioning', 'active', 'migrating', 'waiting', 'releasing') \
             ORDER BY FIELD(status, 'provisioning', 'active', 'migrating', 'waiting', \
             'releasing'), created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        self.details_of(rentals).await
    }

    /// The current workers, placements and last snapshots of `rentals`, in three
    /// statements.
    async fn details_of(
        &self,
        rentals: Vec<RentalRecord>,
    ) -> Result<Vec<RentalDetail>, StoreError> {
        let ids: Vec<&str> = rentals.iter().map(|r| r.id.as_str()).collect();
        let mut placements: HashMap<String, Vec<PlacementRecord>> = HashMap::new();
        for p in placements_of(&self.pool, &ids).await? {
            placements.entry(p.rental_id.clone()).or_default().push(p);
        }
        let worker_ids: Vec<u64> = rentals.iter().filter_map(|r| r.worker_id).collect();
        let workers: HashMap<u64, Worker> = workers_by_id(&self.pool, &worker_ids)
            .await?
            .into_iter()
            .map(|w| (w.id, w))
            .collect();
        let mut snapshots: HashMap<String, super::SnapshotInfo> = self
            .latest_snapshots(&ids)
            .await?
            .into_iter()
            .map(|s| (s.rental_id.clone(), s))
            .collect();
        Ok(rentals
            .into_iter()
            .map(|rental| RentalDetail {
                worker: rental.worker_id.and_then(|id| workers.get(&id).cloned()),
                placements: placements.remove(&rental.id).unwrap_or_default(),
                snapshot: snapshots.remove(&rental.id),
                rental,
            })
            .collect())
    }
}

/// The workers with these ids, in one statement.
async fn workers_by_id<'e, E>(executor: E, ids: &[u64]) -> Result<Vec<Worker>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = MySql>,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Worker ids are numbers: written into the statement, they cannot inject anything.
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    sqlx::query_as(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE id IN ({})",
        ids.join(", ")
    ))
    .fetch_all(executor)
    .await
}

async fn fetch_rental(
    tx: &mut Transaction<'_, MySql>,
    id: &str,
) -> Result<Option<RentalRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// Ends a rental as failed, with its placement, and says why.
async fn fail_in(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    worker: &Worker,
    account_removed: bool,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE rentals SET status = 'failed', worker_id = NULL, \
         updated_at = UTC_TIMESTAMP(6), ended_at = UTC_TIMESTAMP(6) WHERE id = ?",
    )
    .bind(rental_id)
    .execute(&mut **tx)
    .await?;
    end_placement(tx, rental_id, worker.id, account_removed).await?;
    events::append_in(
        tx,
        "rental.failed",
        Some(&worker.name),
        Some(rental_id),
        reason,
    )
    .await?;
    Ok(())
}

async fn fetch_rental_for_update(
    tx: &mut Transaction<'_, MySql>,
    id: &str,
) -> Result<Option<RentalRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {RENTAL_COLUMNS} FROM rentals WHERE id = ? FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// The site of the worker a rental was last placed on, if any.
async fn last_site(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT w.site FROM placements p JOIN workers w ON w.id = p.worker_id \
         WHERE p.rental_id = ? ORDER BY p.id DESC LIMIT 1",
    )
    .bind(rental_id)
    .fetch_optional(&mut **tx)
    .await
}
