//! Workers: the row type, with the rules of a worker (each a predicate and its SQL
//! fragment side by side), and the reads of the fleet (lists, counts, site health).
//!
//! What writes a worker is in the room of its concern: [`super::inventory`] (the
//! inventory's sync), [`super::probes`] (what probes observed), [`super::host_keys`]
//! (trust on first use and host certificates), [`super::service`] (quarantine, restore,
//! drain), [`super::cleanups`] (leftover accounts) and [`super::claims`] (a rental taking
//! a worker).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, MySql};

use super::{Store, StoreError};
use crate::inventory::{Labels, WorkerSpec};
use crate::model::WorkerStatus;
use crate::probe::policy::SiteHealth;

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
