//! The inventory as stored: the workers not retired make the inventory Orion holds, and
//! an edit of it (the file applied at start, or a change through the API) is written as
//! the difference, an event per worker, in one transaction.

use sqlx::{MySql, Transaction};

use super::workers::WORKER_COLUMNS;
use super::{Store, StoreError, Worker, events};
use crate::inventory::{Change, EditError, Inventory, Known, Labels, WorkerSpec, diff};

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
