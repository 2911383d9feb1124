//! Workers: the inventory as stored, and what the probes observed.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::mysql::MySqlRow;
use sqlx::{MySql, Row, Transaction};

use super::{Store, StoreError, events};
use crate::inventory::Inventory;
use crate::model::WorkerStatus;

/// A worker row.
#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    #[serde(skip)]
    pub id: u64,
    pub name: String,
    pub site: String,
    #[serde(skip)]
    pub ssh_host: String,
    #[serde(skip)]
    pub ssh_port: u16,
    #[serde(rename = "host")]
    pub public_host: String,
    #[serde(rename = "port")]
    pub public_port: u16,
    #[serde(skip)]
    pub pinned_host_key: Option<String>,
    #[serde(skip)]
    pub known_host_key: Option<String>,
    pub status: WorkerStatus,
    #[serde(skip)]
    pub consecutive_failures: u32,
    #[serde(skip)]
    pub consecutive_successes: u32,
    /// Why the worker must not be used (host key changed), if it must not.
    pub quarantine_reason: Option<String>,
    pub retired: bool,
    /// In maintenance: no new rentals, and its tenants are moved away.
    pub drained: bool,
    #[serde(skip)]
    pub rental_id: Option<String>,
    pub last_checked: Option<DateTime<Utc>>,
    pub last_seen_alive: Option<DateTime<Utc>>,
    pub probe_latency_ms: Option<u32>,
    pub last_probe_error: Option<String>,
}

impl Worker {
    /// Held by a rental, serving it or awaiting cleanup of its account.
    pub fn allocated(&self) -> bool {
        self.rental_id.is_some()
    }

    /// The host key connections must present: pinned wins over trusted-on-first-use.
    pub fn expected_host_key(&self) -> Option<&str> {
        self.pinned_host_key
            .as_deref()
            .or(self.known_host_key.as_deref())
    }

    /// Where to reach this worker over SSH, with the host key it must present.
    pub fn target(&self) -> crate::ssh::Target {
        crate::ssh::Target {
            name: self.name.clone(),
            host: self.ssh_host.clone(),
            port: self.ssh_port,
            host_key: self
                .expected_host_key()
                .and_then(crate::ssh::parse_host_key),
        }
    }

    pub(super) fn from_row(row: &MySqlRow) -> Result<Self, sqlx::Error> {
        let status: String = row.try_get("status")?;
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            site: row.try_get("site")?,
            ssh_host: row.try_get("ssh_host")?,
            ssh_port: row.try_get("ssh_port")?,
            public_host: row.try_get("public_host")?,
            public_port: row.try_get("public_port")?,
            pinned_host_key: row.try_get("pinned_host_key")?,
            known_host_key: row.try_get("known_host_key")?,
            status: status
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            consecutive_failures: row.try_get("consecutive_failures")?,
            consecutive_successes: row.try_get("consecutive_successes")?,
            quarantine_reason: row.try_get("quarantine_reason")?,
            retired: row.try_get("retired")?,
            drained: row.try_get("drained")?,
            rental_id: row.try_get("rental_id")?,
            last_checked: row.try_get("last_checked")?,
            last_seen_alive: row.try_get("last_seen_alive")?,
            probe_latency_ms: row.try_get("probe_latency_ms")?,
            last_probe_error: row.try_get("last_probe_error")?,
        })
    }
}

pub(super) const WORKER_COLUMNS: &str = "id, name, site, ssh_host, ssh_port, public_host, \
    public_port, pinned_host_key, known_host_key, status, consecutive_failures, \
    consecutive_successes, quarantine_reason, retired, drained, rental_id, last_checked, \
    last_seen_alive, probe_latency_ms, last_probe_error";

/// The rental holding a worker, as the fleet view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Occupant {
    #[serde(rename = "id")]
    pub rental_id: String,
    pub tenant: String,
    pub username: String,
    /// Whether the rental lives on this worker now. `false` while the worker is held only
    /// until its leftover account is removed (the rental moved away or ended while the
    /// worker was down).
    pub serving: bool,
}

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

/// Fleet counts for `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerCounts {
    pub total: i64,
    pub alive: i64,
    pub dead: i64,
    /// Not (yet) dead, but their last probe failed.
    pub failing: i64,
    pub unknown: i64,
    pub allocated: i64,
    pub free: i64,
    pub quarantined: i64,
}

/// A tenant account left on a worker by a rental that no longer lives there.
#[derive(Debug, Clone)]
pub struct Cleanup {
    pub placement_id: u64,
    pub rental_id: String,
    pub username: String,
    /// The account's uid (`None` for a placement made before Orion allocated uids).
    pub uid: Option<u32>,
    pub worker: Worker,
}

impl Store {
    /// Brings the workers table in line with the inventory: new workers are added,
    /// changed ones updated, missing ones retired (never deleted: a retired worker may
    /// still hold a rental, and its history stays). Returns the events it wrote.
    pub async fn sync_inventory(&self, inventory: &Inventory) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let existing: Vec<Worker> =
            sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers FOR UPDATE"))
                .try_map(|r: MySqlRow| Worker::from_row(&r))
                .fetch_all(&mut *tx)
                .await?;
        let mut changes = Vec::new();
        for spec in &inventory.workers {
            match existing.iter().find(|w| w.name == spec.name) {
                None => {
                    sqlx::query(
                        "INSERT INTO workers (name, site, ssh_host, ssh_port, public_host, \
                         public_port, pinned_host_key, created_at, updated_at) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    )
                    .bind(&spec.name)
                    .bind(&spec.site)
                    .bind(&spec.ssh_host)
                    .bind(spec.ssh_port)
                    .bind(&spec.public_host)
                    .bind(spec.public_port)
                    .bind(&spec.host_key)
                    .execute(&mut *tx)
                    .await?;
                    let msg = format!(
                        "added from the inventory at {}:{}",
                        spec.ssh_host, spec.ssh_port
                    );
                    events::append_in(&mut tx, "worker.added", Some(&spec.name), None, &msg)
                        .await?;
                    changes.push(format!("{}: {msg}", spec.name));
                }
                Some(w) => {
                    let same = w.site == spec.site
                        && w.ssh_host == spec.ssh_host
                        && w.ssh_port == spec.ssh_port
                        && w.public_host == spec.public_host
                        && w.public_port == spec.public_port
                        && w.pinned_host_key == spec.host_key
                        && !w.retired;
                    if same {
                        continue;
                    }
                    // A new pinned key is the operator's word on the worker's identity:
                    // it replaces what was trusted on first use and lifts a quarantine.
                    let key_changed = w.pinned_host_key != spec.host_key;
                    sqlx::query(
                        "UPDATE workers SET site = ?, ssh_host = ?, ssh_port = ?, \
                         public_host = ?, public_port = ?, pinned_host_key = ?, retired = FALSE, \
                         known_host_key = IF(?, NULL, known_host_key), \
                         quarantine_reason = IF(?, NULL, quarantine_reason), \
                         updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
                    )
                    .bind(&spec.site)
                    .bind(&spec.ssh_host)
                    .bind(spec.ssh_port)
                    .bind(&spec.public_host)
                    .bind(spec.public_port)
                    .bind(&spec.host_key)
                    .bind(key_changed)
                    .bind(key_changed)
                    .bind(w.id)
                    .execute(&mut *tx)
                    .await?;
                    let msg = if w.retired {
                        "back in the inventory".to_owned()
                    } else {
                        "updated from the inventory".to_owned()
                    };
                    events::append_in(&mut tx, "worker.updated", Some(&w.name), None, &msg).await?;
                    changes.push(format!("{}: {msg}", w.name));
                }
            }
        }
        for w in existing.iter().filter(|w| !w.retired) {
            if inventory.workers.iter().any(|s| s.name == w.name) {
                continue;
            }
            sqlx::query(
                "UPDATE workers SET retired = TRUE, updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
            )
            .bind(w.id)
            .execute(&mut *tx)
            .await?;
            let msg = if w.allocated() {
                "gone from the inventory: retired, its rental stays until it moves or ends"
            } else {
                "gone from the inventory: retired"
            };
            events::append_in(&mut tx, "worker.retired", Some(&w.name), None, msg).await?;
            changes.push(format!("{}: {msg}", w.name));
        }
        tx.commit().await?;
        Ok(changes)
    }

    /// Every worker, retired ones included, by name.
    pub async fn list_workers(&self) -> Result<Vec<Worker>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY name"
        ))
        .try_map(|r: MySqlRow| Worker::from_row(&r))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every worker, as [`Store::list_workers`], with the rental that holds it, if any.
    pub async fn list_workers_with_occupants(
        &self,
    ) -> Result<Vec<(Worker, Option<Occupant>)>, StoreError> {
        // The rental's columns are renamed in a derived table so that the worker's
        // columns can be read by their plain names.
        Ok(sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS}, o.o_tenant, o.o_username, o.o_worker_id FROM workers \
             LEFT JOIN (SELECT id AS o_id, tenant AS o_tenant, username AS o_username, \
             worker_id AS o_worker_id FROM rentals) AS o ON o.o_id = workers.rental_id \
             ORDER BY name"
        ))
        .try_map(|r: MySqlRow| {
            let worker = Worker::from_row(&r)?;
            let tenant: Option<String> = r.try_get("o_tenant")?;
            let occupant = match (&worker.rental_id, tenant) {
                (Some(rental_id), Some(tenant)) => {
                    let lives_on: Option<u64> = r.try_get("o_worker_id")?;
                    Some(Occupant {
                        rental_id: rental_id.clone(),
                        tenant,
                        username: r.try_get("o_username")?,
                        serving: lives_on == Some(worker.id),
                    })
                }
                _ => None,
            };
            Ok((worker, occupant))
        })
        .fetch_all(&self.pool)
        .await?)
    }

    /// The workers the probe loop must visit: all but retired ones.
    pub async fn probe_targets(&self) -> Result<Vec<Worker>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE retired = FALSE ORDER BY name"
        ))
        .try_map(|r: MySqlRow| Worker::from_row(&r))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn worker_by_id(&self, id: u64) -> Result<Option<Worker>, StoreError> {
        Ok(super::rentals::fetch_worker(&self.pool, Some(id)).await?)
    }

    pub async fn worker_by_name(&self, name: &str) -> Result<Option<Worker>, StoreError> {
        Ok(sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE name = ?"
        ))
        .bind(name)
        .try_map(|r: MySqlRow| Worker::from_row(&r))
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Writes a probe's conclusion; when the status changes, the event is written in the
    /// same transaction.
    pub async fn record_probe(
        &self,
        worker: &Worker,
        record: &ProbeRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE workers SET status = ?, consecutive_failures = ?, consecutive_successes = ?, \
             last_checked = UTC_TIMESTAMP(6), \
             last_seen_alive = IF(?, UTC_TIMESTAMP(6), last_seen_alive), \
             probe_latency_ms = ?, last_probe_error = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE id = ?",
        )
        .bind(record.status.as_str())
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
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Records failed probes that have not (yet) made the worker dead.
    pub async fn record_failing(&self, worker: &Worker, failures: u32) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE workers SET consecutive_failures = ?, consecutive_successes = 0, \
             last_checked = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(failures)
        .bind(worker.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a host key trusted on first use. Returns false if another key was recorded
    /// meanwhile (the caller then treats the connection as a mismatch).
    pub async fn trust_host_key(&self, worker: &Worker, key: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
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

    /// Takes a worker out of service until an operator says otherwise.
    pub async fn quarantine(&self, worker: &Worker, reason: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE workers SET quarantine_reason = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE id = ? AND quarantine_reason IS NULL",
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

    /// Puts a worker in or out of maintenance. False if there is no such worker.
    pub async fn set_drained(&self, name: &str, drained: bool) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
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

    /// Worker counts by status, for `/health`.
    pub async fn worker_counts(&self) -> Result<WorkerCounts, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             CAST(COALESCE(SUM(status = 'alive'), 0) AS SIGNED) AS alive, \
             CAST(COALESCE(SUM(status = 'dead'), 0) AS SIGNED) AS dead, \
             CAST(COALESCE(SUM(status <> 'dead' AND consecutive_failures > 0), 0) AS SIGNED) \
                 AS failing, \
             CAST(COALESCE(SUM(status = 'unknown'), 0) AS SIGNED) AS unknown, \
             CAST(COALESCE(SUM(rental_id IS NOT NULL), 0) AS SIGNED) AS allocated, \
             CAST(COALESCE(SUM(rental_id IS NULL AND status = 'alive' \
                 AND quarantine_reason IS NULL AND NOT drained), 0) AS SIGNED) AS free, \
             CAST(COALESCE(SUM(quarantine_reason IS NOT NULL), 0) AS SIGNED) AS quarantined \
             FROM workers WHERE retired = FALSE",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(WorkerCounts {
            total: row.try_get("total")?,
            alive: row.try_get("alive")?,
            dead: row.try_get("dead")?,
            failing: row.try_get("failing")?,
            unknown: row.try_get("unknown")?,
            allocated: row.try_get("allocated")?,
            free: row.try_get("free")?,
            quarantined: row.try_get("quarantined")?,
        })
    }

    /// Tenant accounts left on alive workers by rentals that no longer live there
    /// (released, failed, or moved away): they must be removed before the worker is
    /// offered again.
    pub async fn pending_cleanups(&self) -> Result<Vec<Cleanup>, StoreError> {
        let columns: String = WORKER_COLUMNS
            .split(", ")
            .map(|c| format!("w.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "SELECT p.id AS placement_id, p.rental_id AS placement_rental, p.uid AS placement_uid, \
             r.username, {columns} \
             FROM placements p JOIN workers w ON w.id = p.worker_id \
             JOIN rentals r ON r.id = p.rental_id \
             WHERE p.state = 'stale' AND w.status = 'alive' AND w.quarantine_reason IS NULL \
             ORDER BY p.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Cleanup {
                    placement_id: r.try_get("placement_id")?,
                    rental_id: r.try_get("placement_rental")?,
                    username: r.try_get("username")?,
                    uid: r.try_get("placement_uid")?,
                    worker: Worker::from_row(r)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// The account of a stale placement is gone from its worker: the placement becomes
    /// history and the worker is free again (unless another stale placement holds it).
    pub async fn finish_cleanup(&self, cleanup: &Cleanup) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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
    }
}

/// Ends a placement whose account is gone, and frees its worker if this rental held it.
pub(super) async fn release_placement(
    tx: &mut Transaction<'_, MySql>,
    placement_id: u64,
    worker_id: u64,
    rental_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE placements SET state = 'released', ended_at = COALESCE(ended_at, UTC_TIMESTAMP(6)) \
         WHERE id = ?",
    )
    .bind(placement_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE workers SET rental_id = NULL, updated_at = UTC_TIMESTAMP(6) \
         WHERE id = ? AND rental_id = ?",
    )
    .bind(worker_id)
    .bind(rental_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
