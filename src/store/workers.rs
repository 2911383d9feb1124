//! Workers: the inventory as stored, and what the probes observed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, MySql, Transaction};

use super::placements::release_placement;
use super::{Store, StoreError, events, retry_on_conflict};
use crate::inventory::{Change, EditError, Inventory, Known, Labels, WorkerSpec, diff};
use crate::model::WorkerStatus;
use crate::probe_policy::SiteHealth;

/// A worker row.
// The API shows the fields not marked `skip`. Read back from its JSON (by the client), the
// others are left empty (`Default`): `allocated()` and `target()` mean nothing there (the
// client reads `allocated` from `WorkerView`).
#[derive(Debug, Clone, Serialize, Deserialize, FromRow, utoipa::ToSchema)]
pub struct Worker {
    #[serde(skip)]
    pub id: u64,
    pub name: String,
    pub site: String,
    /// Free-form `key = value` labels from the inventory.
    #[sqlx(try_from = "String")]
    pub labels: LabelSet,
    #[serde(skip)]
    pub ssh_host: String,
    #[serde(skip)]
    pub ssh_port: u16,
    #[serde(rename = "host")]
    pub public_host: String,
    #[serde(rename = "port")]
    pub public_port: u16,
    /// Where its apps' instances are reached (`None`: the public host).
    #[serde(skip)]
    pub app_host: Option<String>,
    /// The container whose namespaces its instances join (the lab), if any.
    #[serde(skip)]
    pub instances_join: Option<String>,
    #[serde(skip)]
    pub pinned_host_key: Option<String>,
    #[serde(skip)]
    pub known_host_key: Option<String>,
    /// The host key Orion's CA last certified on this worker.
    #[serde(skip)]
    pub host_cert_key: Option<String>,
    /// When that certificate ends.
    #[serde(skip)]
    pub host_cert_expires: Option<DateTime<Utc>>,
    pub status: WorkerStatus,
    #[serde(skip)]
    pub consecutive_failures: u32,
    #[serde(skip)]
    pub consecutive_successes: u32,
    /// Why the worker must not be used (host key changed), if it must not.
    pub quarantine_reason: Option<String>,
    /// Since when it is quarantined: `POST /api/workers/{name}/restore` ends it.
    pub quarantined_at: Option<DateTime<Utc>>,
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

/// A worker's labels as stored: a JSON object of strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct LabelSet(pub Labels);

impl TryFrom<String> for LabelSet {
    type Error = serde_json::Error;

    fn try_from(json: String) -> Result<Self, Self::Error> {
        serde_json::from_str(&json).map(LabelSet)
    }
}

/// Where a rental may be placed: only on `site` (if set), only on workers with all of
/// `labels`, on `prefer_site` first (if set).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    pub site: Option<String>,
    pub labels: Labels,
    pub prefer_site: Option<String>,
}

impl Constraints {
    /// `labels` as the JSON object `JSON_CONTAINS` takes (`None`: no labels asked).
    fn labels_json(&self) -> Option<String> {
        (!self.labels.is_empty())
            .then(|| serde_json::to_string(&self.labels).expect("labels are strings"))
    }

    /// The request field a "nothing free" answer names: the hard constraint.
    pub fn field(&self) -> Option<&'static str> {
        if self.site.is_some() {
            Some("site")
        } else if !self.labels.is_empty() {
            Some("labels")
        } else {
            None
        }
    }

    /// What no free worker matched, in words, for an error (`None`: no constraint).
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(site) = &self.site {
            parts.push(format!("on site `{site}`"));
        }
        if !self.labels.is_empty() {
            parts.push(format!(
                "with labels {}",
                crate::inventory::show_labels(&self.labels)
            ));
        }
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

impl Worker {
    /// The worker as the inventory describes it.
    pub fn spec(&self) -> WorkerSpec {
        WorkerSpec {
            name: self.name.clone(),
            site: self.site.clone(),
            labels: self.labels.0.clone(),
            ssh_host: self.ssh_host.clone(),
            ssh_port: self.ssh_port,
            public_host: self.public_host.clone(),
            public_port: self.public_port,
            host_key: self.pinned_host_key.clone(),
            app_host: self.app_host.clone(),
            instances_join: self.instances_join.clone(),
        }
    }

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

    /// Whether the worker presents a host certificate for the key Orion trusts, valid
    /// past `until`: if not, one must be installed before tenants log in.
    pub fn host_cert_current(&self, until: DateTime<Utc>) -> bool {
        self.host_cert_key.is_some()
            && self.host_cert_key.as_deref() == self.expected_host_key()
            && self.host_cert_expires.is_some_and(|e| e > until)
    }
}

/// The rules of a worker: each a predicate on a worker already read with, beside it, the
/// same condition on a `workers` row (`…_SQL`, for a query's `WHERE`), so that a rule
/// changes in one place. `tests/api/worker_rules.rs` checks that each pair agrees on
/// every combination of status, quarantine, retired and drained.
impl Worker {
    /// [`Worker::answers`] on a `workers` row.
    pub const ANSWERS_SQL: &str = "(status = 'alive' AND quarantine_reason IS NULL)";

    /// Whether the worker answers and is trusted: alive (its probes pass) and not
    /// quarantined (a changed host key may be a stranger's). The least Orion asks of a
    /// worker before acting on it (removing an account, taking a home's last snapshot,
    /// following its events), retired and drained ones included.
    pub fn answers(&self) -> bool {
        self.status == WorkerStatus::Alive && self.quarantine_reason.is_none()
    }

    /// [`Worker::is_tended`] on a `workers` row.
    pub const TENDED_SQL: &str = "(status = 'alive' AND quarantine_reason IS NULL AND NOT retired)";

    /// Whether Orion keeps the worker in shape (renews its host certificate, makes it
    /// hold exactly its app instances): it answers and is still in the inventory. A
    /// drained worker is tended: it serves until its work has moved.
    pub fn is_tended(&self) -> bool {
        self.answers() && !self.retired
    }

    /// [`Worker::is_usable`] on a `workers` row.
    pub const USABLE_SQL: &str =
        "(status = 'alive' AND quarantine_reason IS NULL AND NOT retired AND NOT drained)";

    /// Whether the worker may take new work (a rental, an app instance) or keep a
    /// rental: it is tended and not drained.
    pub fn is_usable(&self) -> bool {
        self.is_tended() && !self.drained
    }

    /// Whether a rental on the worker must move elsewhere: the worker is not usable
    /// (dead, quarantined, retired or drained). On a `workers` row it is `NOT`
    /// [`Worker::USABLE_SQL`]; a rental's query says `worker_id NOT IN (SELECT id FROM
    /// workers WHERE …)`, so that a rental whose worker row is gone moves too.
    pub fn must_leave(&self) -> bool {
        !self.is_usable()
    }

    /// Why a rental leaves the worker ([`Worker::must_leave`]), for event messages.
    pub fn why_leaving(&self) -> &'static str {
        if self.drained {
            "drained"
        } else if self.quarantine_reason.is_some() {
            "quarantined"
        } else if self.retired {
            "retired"
        } else {
            "dead"
        }
    }

    /// [`Worker::is_withdrawn`] on a `workers` row.
    pub const WITHDRAWN_SQL: &str = "(quarantine_reason IS NOT NULL OR retired)";

    /// Whether the worker is out of service by a decision rather than a fault:
    /// quarantined (its host key may be in a stranger's hands) or retired. Its host
    /// certificate is revoked, and its silence says nothing of its site's health. A
    /// drained worker is not withdrawn: it serves until its work has moved.
    pub fn is_withdrawn(&self) -> bool {
        self.quarantine_reason.is_some() || self.retired
    }

    /// [`Worker::is_lost`] on a `workers` row.
    pub const LOST_SQL: &str = "(status = 'dead' OR quarantine_reason IS NOT NULL OR retired)";

    /// Whether what runs on the worker is lost with it: it is dead or withdrawn. Unlike
    /// [`Worker::must_leave`], a drained worker's app instances are not lost (they are
    /// replaced elsewhere before they stop), nor a new (`unknown`) worker's.
    pub fn is_lost(&self) -> bool {
        self.status == WorkerStatus::Dead || self.is_withdrawn()
    }
}

pub(super) const WORKER_COLUMNS: &str = "id, name, site, labels, ssh_host, ssh_port, public_host, \
    public_port, app_host, instances_join, pinned_host_key, known_host_key, host_cert_key, \
    host_cert_expires, status, consecutive_failures, \
    consecutive_successes, quarantine_reason, quarantined_at, retired, drained, rental_id, last_checked, \
    last_seen_alive, probe_latency_ms, last_probe_error";

/// The rental holding a worker, as the fleet view shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Default, Serialize, FromRow, utoipa::ToSchema)]
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
#[derive(Debug, Clone, FromRow)]
pub struct Cleanup {
    pub placement_id: u64,
    #[sqlx(rename = "placement_rental")]
    pub rental_id: String,
    pub username: String,
    /// The account's uid (`None` for a placement made before Orion allocated uids).
    #[sqlx(rename = "placement_uid")]
    pub uid: Option<u32>,
    #[sqlx(flatten)]
    pub worker: Worker,
}

/// A worker row with the columns of the rental holding it, renamed `o_*` (see
/// [`Store::list_workers_with_occupants`]).
#[derive(FromRow)]
struct WorkerRow {
    #[sqlx(flatten)]
    worker: Worker,
    o_tenant: Option<String>,
    o_username: Option<String>,
    o_worker_id: Option<u64>,
}

impl Store {
    /// Applies an edit of the inventory: `edit` is given the inventory Orion holds (its
    /// workers not retired) and returns the one wanted; the difference is written, with
    /// an event per worker, in one transaction (nothing with `dry_run`). Workers are never
    /// deleted: a retired one stays, out of service, with its history, and a rental on
    /// it moves away first (the migration loop). Returns the changes.
    pub async fn apply_inventory<F>(
        &self,
        edit: F,
        dry_run: bool,
    ) -> Result<Vec<Change>, StoreError>
    where
        F: FnOnce(&Inventory) -> Result<Inventory, EditError>,
    {
        let mut tx = self.begin().await?;
        let (rows, current) = held_inventory(&mut tx).await?;
        let wanted = edit(&current)?;
        let changes = write_inventory(&mut tx, &rows, &wanted, dry_run).await?;
        if dry_run || changes.is_empty() {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(changes)
    }

    /// Applies the inventory file (its text's SHA-256 is `digest`). With `unless_applied`
    /// (a start), a file already applied as it is now is not applied again: workers
    /// added, changed or retired through the API since then stand. `None`: skipped so.
    pub async fn apply_inventory_file(
        &self,
        inventory: &Inventory,
        digest: &str,
        unless_applied: bool,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let mut tx = self.begin().await?;
        let applied: Option<String> =
            sqlx::query_scalar("SELECT digest FROM inventory_applied WHERE id = 1 FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await?;
        if unless_applied && applied.as_deref() == Some(digest) {
            tx.rollback().await?;
            return Ok(None);
        }
        let (rows, held) = held_inventory(&mut tx).await?;
        let wanted = held.replaced_by(inventory.clone())?;
        let changes = write_inventory(&mut tx, &rows, &wanted, false).await?;
        sqlx::query(
            "INSERT INTO inventory_applied (id, digest, applied_at) \
             VALUES (1, ?, UTC_TIMESTAMP(6)) \
             ON DUPLICATE KEY UPDATE digest = VALUES(digest), applied_at = VALUES(applied_at)",
        )
        .bind(digest)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(changes))
    }

    /// The inventory Orion holds: its workers not retired, in the order they came.
    pub async fn inventory(&self) -> Result<Inventory, StoreError> {
        let rows: Vec<Worker> = sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE NOT retired ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(Inventory {
            workers: rows.iter().map(Worker::spec).collect(),
        })
    }

    /// The sites and labels of the workers in service (not retired), for checking what
    /// a rent asks for.
    pub async fn known_placement(
        &self,
    ) -> Result<(std::collections::BTreeSet<String>, Vec<Labels>), StoreError> {
        let inventory = self.inventory().await?;
        let sites = inventory.workers.iter().map(|w| w.site.clone()).collect();
        let labels = inventory.workers.into_iter().map(|w| w.labels).collect();
        Ok((sites, labels))
    }

    /// Every worker, retired ones included, by name.
    pub async fn list_workers(&self) -> Result<Vec<Worker>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every worker, as [`Store::list_workers`], with the rental that holds it, if any.
    pub async fn list_workers_with_occupants(
        &self,
    ) -> Result<Vec<(Worker, Option<Occupant>)>, StoreError> {
        // The rental's columns are renamed in a derived table so that the worker's
        // columns can be read by their plain names.
        let rows: Vec<WorkerRow> = sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS}, o.o_tenant, o.o_username, o.o_worker_id FROM workers \
             LEFT JOIN (SELECT id AS o_id, tenant AS o_tenant, username AS o_username, \
             worker_id AS o_worker_id FROM rentals) AS o ON o.o_id = workers.rental_id \
             ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let w = row.worker;
                let occupant = match (&w.rental_id, row.o_tenant, row.o_username) {
                    (Some(rental_id), Some(tenant), Some(username)) => Some(Occupant {
                        rental_id: rental_id.clone(),
                        tenant,
                        username,
                        serving: row.o_worker_id == Some(w.id),
                    }),
                    _ => None,
                };
                (w, occupant)
            })
            .collect())
    }

    /// The workers the probe loop must visit: all but retired ones, and retired ones
    /// still held by a rental (it moves away, then its account is removed there: both
    /// need the worker's state known).
    pub async fn probe_targets(&self) -> Result<Vec<Worker>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE retired = FALSE OR rental_id IS NOT NULL \
             ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn worker_by_id(&self, id: u64) -> Result<Option<Worker>, StoreError> {
        Ok(fetch_worker(&self.pool, Some(id)).await?)
    }

    pub async fn worker_by_name(&self, name: &str) -> Result<Option<Worker>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE name = ?"
        ))
        .bind(name)
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

    /// Worker counts by status, for `/health`.
    pub async fn worker_counts(&self) -> Result<WorkerCounts, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT COUNT(*) AS total, \
             CAST(COALESCE(SUM(status = 'alive'), 0) AS SIGNED) AS alive, \
             CAST(COALESCE(SUM(status = 'dead'), 0) AS SIGNED) AS dead, \
             CAST(COALESCE(SUM(status <> 'dead' AND consecutive_failures > 0), 0) AS SIGNED) \
                 AS failing, \
             CAST(COALESCE(SUM(status = 'unknown'), 0) AS SIGNED) AS unknown, \
             CAST(COALESCE(SUM(rental_id IS NOT NULL), 0) AS SIGNED) AS allocated, \
             CAST(COALESCE(SUM(rental_id IS NULL AND {usable}), 0) AS SIGNED) AS free, \
             CAST(COALESCE(SUM(quarantine_reason IS NOT NULL), 0) AS SIGNED) AS quarantined \
             FROM workers WHERE retired = FALSE",
            usable = Worker::USABLE_SQL,
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Per site, how many workers are in service, dead and failing.
    pub async fn site_health(&self) -> Result<Vec<SiteHealth>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT site, COUNT(*) AS total, \
             CAST(COALESCE(SUM(status = 'dead'), 0) AS SIGNED) AS dead, \
             CAST(COALESCE(SUM(status <> 'dead' AND consecutive_failures > 0), 0) AS SIGNED) \
                 AS failing \
             FROM workers WHERE retired = FALSE GROUP BY site ORDER BY site",
        )
        .fetch_all(&self.pool)
        .await?)
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
        // Drained and retired workers are cleaned too: only a worker that answers and
        // is trusted can be. The account a rental is moving off stays until the move is
        // over: a planned move takes its final snapshot there first.
        Ok(sqlx::query_as(&format!(
            "SELECT p.id AS placement_id, p.rental_id AS placement_rental, p.uid AS placement_uid, \
             r.username, {columns} \
             FROM placements p JOIN workers w ON w.id = p.worker_id \
             JOIN rentals r ON r.id = p.rental_id \
             WHERE p.state = 'stale' \
             AND p.worker_id IN (SELECT id FROM workers WHERE {answers}) \
             AND NOT (r.status = 'migrating' AND p.worker_id <> COALESCE(r.worker_id, 0)) \
             ORDER BY p.id",
            answers = Worker::ANSWERS_SQL,
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The account of a stale placement is gone from its worker: the placement becomes
    /// history and the worker is free again (unless another stale placement holds it).
    pub async fn finish_cleanup(&self, cleanup: &Cleanup) -> Result<(), StoreError> {
        retry_on_conflict(|| async move {
            let mut tx = self.begin().await?;
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
        })
        .await
    }
}

/// The worker with this id, if any (`None` in, `None` out).
pub(super) async fn fetch_worker<'e, E>(
    executor: E,
    id: Option<u64>,
) -> Result<Option<Worker>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = MySql>,
{
    let Some(id) = id else {
        return Ok(None);
    };
    sqlx::query_as(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(executor)
    .await
}

/// Every worker row, locked, and the inventory they make (those not retired).
async fn held_inventory(
    tx: &mut Transaction<'_, MySql>,
) -> Result<(Vec<Worker>, Inventory), sqlx::Error> {
    let rows: Vec<Worker> = sqlx::query_as(&format!(
        "SELECT {WORKER_COLUMNS} FROM workers ORDER BY id FOR UPDATE"
    ))
    .fetch_all(&mut **tx)
    .await?;
    let current = Inventory {
        workers: rows
            .iter()
            .filter(|w| !w.retired)
            .map(Worker::spec)
            .collect(),
    };
    Ok((rows, current))
}

/// Writes what changes from `rows` to `wanted` (unless `dry_run`), an event each.
async fn write_inventory(
    tx: &mut Transaction<'_, MySql>,
    rows: &[Worker],
    wanted: &Inventory,
    dry_run: bool,
) -> Result<Vec<Change>, sqlx::Error> {
    let known: Vec<Known> = rows
        .iter()
        .map(|w| Known {
            spec: w.spec(),
            retired: w.retired,
            occupied: w.allocated(),
        })
        .collect();
    let changes = diff(&known, wanted);
    if dry_run {
        return Ok(changes);
    }
    for change in &changes {
        let row = rows.iter().find(|w| w.name == change.worker());
        let kind =
            match change {
                Change::Add(spec) => {
                    bind_spec(sqlx::query(
                    "INSERT INTO workers (name, site, labels, ssh_host, ssh_port, public_host, \
                     public_port, app_host, instances_join, pinned_host_key, created_at, \
                     updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                ).bind(&spec.name), spec)
                .execute(&mut **tx)
                .await?;
                    "worker.added"
                }
                Change::Restore(spec) | Change::Update { to: spec, .. } => {
                    let Some(w) = row else { continue };
                    // A new pinned key is the operator's word on the worker's identity: it
                    // replaces what was trusted on first use and lifts a quarantine.
                    let key_changed = w.pinned_host_key != spec.host_key;
                    bind_spec(
                        sqlx::query(
                            "UPDATE workers SET site = ?, labels = ?, ssh_host = ?, ssh_port = ?, \
                         public_host = ?, public_port = ?, app_host = ?, instances_join = ?, \
                         pinned_host_key = ?, retired = FALSE, \
                         known_host_key = IF(?, NULL, known_host_key), \
                         quarantine_reason = IF(?, NULL, quarantine_reason), \
                         quarantined_at = IF(quarantine_reason IS NULL, NULL, quarantined_at), \
                         updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
                        ),
                        spec,
                    )
                    .bind(key_changed)
                    .bind(key_changed)
                    .bind(w.id)
                    .execute(&mut **tx)
                    .await?;
                    "worker.updated"
                }
                Change::Retire { .. } => {
                    let Some(w) = row else { continue };
                    sqlx::query(
                    "UPDATE workers SET retired = TRUE, updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
                )
                .bind(w.id)
                .execute(&mut **tx)
                .await?;
                    "worker.retired"
                }
            };
        let msg = change.to_string();
        // The event's text without the leading `+ name: `.
        let msg = msg.split_once(": ").map_or(msg.as_str(), |(_, rest)| rest);
        events::append_in(tx, kind, Some(change.worker()), None, msg).await?;
    }
    Ok(changes)
}

/// Binds a worker's inventory fields, in the order `site, labels, ssh_host, ssh_port,
/// public_host, public_port, app_host, instances_join, pinned_host_key`.
fn bind_spec<'q>(
    query: sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>,
    spec: &'q WorkerSpec,
) -> sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments> {
    query
        .bind(&spec.site)
        .bind(labels_json(&spec.labels))
        .bind(&spec.ssh_host)
        .bind(spec.ssh_port)
        .bind(&spec.public_host)
        .bind(spec.public_port)
        .bind(&spec.app_host)
        .bind(&spec.instances_join)
        .bind(&spec.host_key)
}

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).expect("labels are strings")
}

/// Claims one usable, free worker for `rental_id` inside `tx`. Rows another
/// transaction is claiming are skipped rather than waited for, so concurrent claims
/// neither block nor deadlock, and never get the same worker. The order is the primary
/// key's, which InnoDB reads without sorting: with a sort it would lock every candidate
/// row before returning the first, and concurrent claims would skip them all.
/// How many workers a claim tries in order of preference before taking any free one.
const PREFERRED_TRIES: usize = 4;

pub(super) async fn claim_free_worker(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    exclude: &[u64],
    constraints: &Constraints,
) -> Result<Option<Worker>, sqlx::Error> {
    // The preferred site first (a hard `site` leaves nothing to prefer), then any.
    let mut sites = vec![constraints.site.as_deref()];
    if constraints.site.is_none()
        && let Some(preferred) = constraints.prefer_site.as_deref()
    {
        sites.insert(0, Some(preferred));
    }
    let labels = constraints.labels_json();
    for site in sites {
        if let Some(worker) = claim_where(tx, rental_id, exclude, site, labels.as_deref()).await? {
            return Ok(Some(worker));
        }
    }
    Ok(None)
}

/// [`claim_free_worker`] among the workers of `site` (any if `None`) that carry all of
/// `labels` (a JSON object; any if `None`).
async fn claim_where(
    tx: &mut Transaction<'_, MySql>,
    rental_id: &str,
    exclude: &[u64],
    site: Option<&str>,
    labels: Option<&str>,
) -> Result<Option<Worker>, sqlx::Error> {
    // Worker ids are numbers: written into the statement, they cannot inject anything.
    let mut filter = String::new();
    if !exclude.is_empty() {
        let ids: Vec<String> = exclude.iter().map(u64::to_string).collect();
        filter.push_str(&format!("AND id NOT IN ({}) ", ids.join(", ")));
    }
    if site.is_some() {
        filter.push_str("AND site = ? ");
    }
    if labels.is_some() {
        filter.push_str("AND JSON_CONTAINS(labels, ?) ");
    }
    // Workers hosting no app instance first: a rented worker hosts none (unless
    // `apps.shared_workers`), so its instances would have to move. The preference is
    // read without locks, then the first few preferred workers are tried one by one:
    // ordering the locking query itself by that count would make InnoDB lock every
    // free row it sorts, and concurrent rents would all skip them.
    let sql = format!(
        "SELECT id FROM workers WHERE rental_id IS NULL AND {usable} {filter}\
         ORDER BY (SELECT COUNT(*) FROM instances i \
                   WHERE i.worker_id = workers.id AND i.ended_at IS NULL), id \
         LIMIT {PREFERRED_TRIES}",
        usable = Worker::USABLE_SQL,
    );
    let mut query = sqlx::query_scalar(&sql);
    for value in [site, labels].into_iter().flatten() {
        query = query.bind(value);
    }
    let preferred: Vec<u64> = query.fetch_all(&mut **tx).await?;
    let mut candidate: Option<Worker> = None;
    for id in preferred {
        candidate = sqlx::query_as(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers \
             WHERE id = ? AND rental_id IS NULL AND {usable} FOR UPDATE SKIP LOCKED",
            usable = Worker::USABLE_SQL,
        ))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        if candidate.is_some() {
            break;
        }
    }
    if candidate.is_none() {
        let sql = format!(
            "SELECT {WORKER_COLUMNS} FROM workers \
             WHERE rental_id IS NULL AND {usable} {filter}\
             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
            usable = Worker::USABLE_SQL,
        );
        let mut query = sqlx::query_as(&sql);
        for value in [site, labels].into_iter().flatten() {
            query = query.bind(value);
        }
        candidate = query.fetch_optional(&mut **tx).await?;
    }
    let Some(mut worker) = candidate else {
        return Ok(None);
    };
    sqlx::query("UPDATE workers SET rental_id = ?, updated_at = UTC_TIMESTAMP(6) WHERE id = ?")
        .bind(rental_id)
        .bind(worker.id)
        .execute(&mut **tx)
        .await?;
    worker.rental_id = Some(rental_id.to_owned());
    Ok(Some(worker))
}
