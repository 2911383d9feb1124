//! Apps and their instances: what tenants asked for, and each container placed for it.
//!
//! The API writes an app's wish; the apps loop places instances (rows first, containers
//! after), records what it observes on the workers, and ends instances once their
//! container is gone. An instance row is never reused: a restarted container keeps its
//! row, a replacement gets a new one.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::FromRow;

use super::{Store, StoreError, events, retry_on_conflict};
use crate::apps::InstanceState;

/// An app row.
#[derive(Debug, Clone, FromRow)]
pub struct AppRecord {
    pub id: u64,
    pub tenant: String,
    pub name: String,
    pub image: String,
    pub replicas: u32,
    /// JSON array of strings, or none.
    pub command: Option<String>,
    /// JSON object of strings.
    pub env: String,
    pub port: Option<u16>,
    pub health_path: String,
    pub generation: u32,
    pub deleting: bool,
    /// Why Caddy refused the app's route (`None`: applied, or not routed).
    pub route_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl AppRecord {
    pub fn command(&self) -> Option<Vec<String>> {
        self.command
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.env).unwrap_or_default()
    }
}

const APP_COLUMNS: &str = "id, tenant, name, image, replicas, command, env, port, health_path, \
    generation, deleting, route_error, created_at, updated_at";

/// An instance row, with what the loop and the views need of its worker.
#[derive(Debug, Clone, FromRow)]
pub struct InstanceRecord {
    pub id: u64,
    pub app_id: u64,
    pub worker_id: u64,
    /// The worker's name.
    pub worker: String,
    /// Where the instance's port is reached.
    pub host: String,
    /// The label that scopes the worker's containers (`instances_join`, else its name).
    pub node: String,
    pub generation: u32,
    pub state: InstanceState,
    pub container: String,
    pub restarts: u32,
    pub crashes: u32,
    pub exit_code: Option<i32>,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub next_start_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const INSTANCE_SELECT: &str = "SELECT i.id, i.app_id, i.worker_id, w.name AS worker, \
    COALESCE(w.app_host, w.public_host) AS host, COALESCE(w.instances_join, w.name) AS node, \
    i.generation, i.state, i.container, i.restarts, i.crashes, i.exit_code, i.last_error, \
    i.started_at, i.next_start_at, i.created_at \
    FROM instances i JOIN workers w ON w.id = i.worker_id";

/// A new app, validated.
#[derive(Debug, Clone)]
pub struct NewApp {
    pub tenant: String,
    pub name: String,
    pub image: String,
    pub replicas: u32,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub port: Option<u16>,
    pub health_path: String,
    /// The most instances the tenant's apps may ask for in all (`None`: no bound).
    pub max_instances: Option<u32>,
}

/// A change to an app, validated.
#[derive(Debug, Clone, Default)]
pub struct AppChange {
    pub replicas: Option<u32>,
    pub image: Option<String>,
    /// The most instances the tenant's apps may ask for in all (`None`: no bound).
    pub max_instances: Option<u32>,
}

/// Under the tenant's row lock, whether its apps (but `except`) and `replicas` more stay
/// within `limit`.
async fn check_instance_quota(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    tenant: &str,
    replicas: u32,
    except: Option<u64>,
    limit: Option<u32>,
) -> Result<(), StoreError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    super::lock_tenant(tx, tenant).await?;
    let others: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(replicas), 0) AS SIGNED) FROM apps \
         WHERE tenant = ? AND NOT deleting AND (? IS NULL OR id <> ?)",
    )
    .bind(tenant)
    .bind(except)
    .bind(except)
    .fetch_one(&mut **tx)
    .await?;
    let others = u32::try_from(others).unwrap_or(u32::MAX);
    if others.saturating_add(replicas) > limit {
        return Err(StoreError::InstanceQuota { limit, others });
    }
    Ok(())
}

/// What one observation or action on an instance changes.
#[derive(Debug, Clone)]
pub enum InstanceUpdate {
    Running {
        started_at: Option<DateTime<Utc>>,
    },
    Exited {
        exit_code: Option<i64>,
        crashes: u32,
        next_start_at: DateTime<Utc>,
        log_tail: Option<String>,
    },
    /// A container was (re)started for it; `restart`: it had run before. It stays
    /// pending until seen running.
    Started {
        restart: bool,
    },
    /// Its start failed; tried again after `next_start_at`.
    StartFailed {
        error: String,
        crashes: u32,
        next_start_at: DateTime<Utc>,
    },
}

impl Store {
    /// Records what Caddy made of each app's route: `refused` maps an app's name to
    /// Caddy's refusal; every other app's route was applied. An event is written when an
    /// app's route is newly refused (or refused for another reason), and when it is
    /// applied again; an unchanged state writes nothing.
    pub async fn record_routes(
        &self,
        applied: &[String],
        refused: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let current: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, route_error FROM apps WHERE NOT deleting FOR UPDATE")
                .fetch_all(&mut *tx)
                .await?;
        for (name, was) in current {
            let now = refused.get(&name);
            if was.as_ref() == now || (now.is_none() && !applied.contains(&name)) {
                continue;
            }
            sqlx::query("UPDATE apps SET route_error = ? WHERE name = ? AND NOT deleting")
                .bind(now)
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            let (kind, message) = match now {
                Some(why) => (
                    "app.route_refused",
                    format!("Caddy refused the route of app {name}; it is not served: {why}"),
                ),
                None => (
                    "app.route_applied",
                    format!("the route of app {name} is applied"),
                ),
            };
            events::append_in(&mut tx, kind, None, None, &message).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a new app. Its name must not be held by another live app of the tenant.
    pub async fn create_app(&self, app: &NewApp) -> Result<AppRecord, StoreError> {
        let command = app
            .command
            .as_ref()
            .map(|c| serde_json::to_string(c).expect("strings serialise"));
        let env = serde_json::to_string(&app.env).expect("strings serialise");
        let mut tx = self.begin().await?;
        check_instance_quota(&mut tx, &app.tenant, app.replicas, None, app.max_instances).await?;
        let inserted = sqlx::query(
            "INSERT INTO apps (tenant, name, image, replicas, command, env, port, health_path, \
             created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        )
        .bind(&app.tenant)
        .bind(&app.name)
        .bind(&app.image)
        .bind(app.replicas)
        .bind(&command)
        .bind(&env)
        .bind(app.port)
        .bind(&app.health_path)
        .execute(&mut *tx)
        .await;
        let id = match inserted {
            Ok(r) => r.last_insert_id(),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::NameTaken(app.name.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        let message = format!(
            "app {} of {}: {} × {}",
            app.name, app.tenant, app.replicas, app.image
        );
        events::append_in(&mut tx, "app.created", None, None, &message).await?;
        tx.commit().await?;
        self.app_by_id(id)
            .await?
            .ok_or_else(|| StoreError::Invariant(format!("app {id} vanished after insert")))
    }

    pub async fn app_by_id(&self, id: u64) -> Result<Option<AppRecord>, StoreError> {
        Ok(
            sqlx::query_as(&format!("SELECT {APP_COLUMNS} FROM apps WHERE id = ?"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// A tenant's live app by name.
    pub async fn app_by_name(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<AppRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {APP_COLUMNS} FROM apps WHERE tenant = ? AND name = ? AND NOT deleting"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Live apps (not being deleted), of one tenant or (`None`) of all, by tenant and name.
    pub async fn live_apps(&self, tenant: Option<&str>) -> Result<Vec<AppRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {APP_COLUMNS} FROM apps WHERE NOT deleting AND (? IS NULL OR tenant = ?) \
             ORDER BY tenant, name"
        ))
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every app, those being deleted too: what the apps loop works on.
    pub async fn all_apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        Ok(
            sqlx::query_as(&format!("SELECT {APP_COLUMNS} FROM apps ORDER BY id"))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Changes an app's replicas and image; a new image is a new generation (its
    /// instances are replaced one at a time). `None` if the app is not there.
    pub async fn change_app(
        &self,
        id: u64,
        change: &AppChange,
    ) -> Result<Option<AppRecord>, StoreError> {
        let mut tx = self.begin().await?;
        let current: Option<AppRecord> = sqlx::query_as(&format!(
            "SELECT {APP_COLUMNS} FROM apps WHERE id = ? AND NOT deleting FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(app) = current else {
            return Ok(None);
        };
        let replicas = change.replicas.unwrap_or(app.replicas);
        if replicas > app.replicas {
            check_instance_quota(
                &mut tx,
                &app.tenant,
                replicas,
                Some(app.id),
                change.max_instances,
            )
            .await?;
        }
        let image = change.image.clone().unwrap_or_else(|| app.image.clone());
        let new_generation = image != app.image;
        if replicas == app.replicas && !new_generation {
            return Ok(Some(app));
        }
        sqlx::query(
            "UPDATE apps SET replicas = ?, image = ?, generation = generation + ?, \
             updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(replicas)
        .bind(&image)
        .bind(u32::from(new_generation))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let mut what = Vec::new();
        if replicas != app.replicas {
            what.push(format!("replicas {} → {replicas}", app.replicas));
        }
        if new_generation {
            what.push(format!("image {} → {image}", app.image));
        }
        let message = format!("app {} of {}: {}", app.name, app.tenant, what.join(", "));
        events::append_in(&mut tx, "app.changed", None, None, &message).await?;
        tx.commit().await?;
        self.app_by_id(id).await
    }

    /// Marks an app deleted: its name is free at once, its instances are stopping and
    /// the apps loop removes them, then the app. `false` if it was not there.
    pub async fn delete_app(&self, id: u64) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let app: Option<AppRecord> = sqlx::query_as(&format!(
            "SELECT {APP_COLUMNS} FROM apps WHERE id = ? AND NOT deleting FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(app) = app else {
            return Ok(false);
        };
        sqlx::query("UPDATE apps SET deleting = TRUE, updated_at = UTC_TIMESTAMP(6) WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE instances SET state = 'stopping', updated_at = UTC_TIMESTAMP(6) \
             WHERE app_id = ? AND ended_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let message = format!("app {} of {}: deleted", app.name, app.tenant);
        events::append_in(&mut tx, "app.deleted", None, None, &message).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Instances not over, of the given apps (every app: `None`), by app then id.
    pub async fn live_instances(
        &self,
        app_id: Option<u64>,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "{INSTANCE_SELECT} WHERE i.ended_at IS NULL AND (? IS NULL OR i.app_id = ?) \
             ORDER BY i.app_id, i.id"
        ))
        .bind(app_id)
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Places a new instance of `app` on a worker: a pending row whose container name
    /// is fixed now, from the worker's node and the row's id.
    pub async fn place_instance(
        &self,
        app: &AppRecord,
        worker_id: u64,
        worker: &str,
        node: &str,
    ) -> Result<u64, StoreError> {
        retry_on_conflict(|| async {
            let mut tx = self.begin().await?;
            let id = sqlx::query(
                "INSERT INTO instances (app_id, worker_id, generation, state, container, \
                 created_at, updated_at) \
                 VALUES (?, ?, ?, 'pending', UUID(), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            )
            .bind(app.id)
            .bind(worker_id)
            .bind(app.generation)
            .execute(&mut *tx)
            .await?
            .last_insert_id();
            let container = crate::apps::container_name(node, &app.name, id);
            sqlx::query("UPDATE instances SET container = ? WHERE id = ?")
                .bind(&container)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let message = format!("app {} of {}: instance {id} placed", app.name, app.tenant);
            events::append_in(&mut tx, "instance.placed", Some(worker), None, &message).await?;
            tx.commit().await?;
            Ok(id)
        })
        .await
    }

    /// Marks instances no longer wanted: the node pass removes their containers.
    pub async fn stop_instances(&self, ids: &[u64]) -> Result<(), StoreError> {
        for id in ids {
            self.write(
                sqlx::query(
                    "UPDATE instances SET state = 'stopping', updated_at = UTC_TIMESTAMP(6) \
                 WHERE id = ? AND ended_at IS NULL",
                )
                .bind(id),
            )
            .await?;
        }
        Ok(())
    }

    /// Records what happened to an instance, with an event when it says something.
    pub async fn update_instance(
        &self,
        instance: &InstanceRecord,
        update: &InstanceUpdate,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let (changed, kind, message) = match update {
            InstanceUpdate::Running { started_at } => {
                let changed = sqlx::query(
                    "UPDATE instances SET state = 'running', \
                     started_at = COALESCE(?, started_at, UTC_TIMESTAMP(6)), \
                     next_start_at = NULL, updated_at = UTC_TIMESTAMP(6) \
                     WHERE id = ? AND state IN ('pending', 'exited', 'running')",
                )
                .bind(started_at)
                .bind(instance.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                (
                    changed,
                    "instance.running",
                    format!("instance {} running", instance.id),
                )
            }
            InstanceUpdate::Exited {
                exit_code,
                crashes,
                next_start_at,
                log_tail,
            } => {
                let changed = sqlx::query(
                    "UPDATE instances SET state = 'exited', exit_code = ?, crashes = ?, \
                     next_start_at = ?, last_error = COALESCE(?, last_error), \
                     updated_at = UTC_TIMESTAMP(6) \
                     WHERE id = ? AND state IN ('pending', 'exited', 'running')",
                )
                .bind(exit_code)
                .bind(crashes)
                .bind(next_start_at)
                .bind(log_tail)
                .bind(instance.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let code = exit_code.map_or("?".to_owned(), |c| c.to_string());
                (
                    changed,
                    "instance.exited",
                    format!(
                        "instance {} exited with {code} (exit {crashes} in a row)",
                        instance.id
                    ),
                )
            }
            InstanceUpdate::Started { restart } => {
                // Pending until the container is seen running: a start that the engine
                // accepted proves nothing about the program (it may exit at once).
                let changed = sqlx::query(
                    "UPDATE instances SET state = 'pending', restarts = restarts + ?, \
                     started_at = UTC_TIMESTAMP(6), next_start_at = NULL, \
                     updated_at = UTC_TIMESTAMP(6) \
                     WHERE id = ? AND state IN ('pending', 'exited', 'running')",
                )
                .bind(u32::from(*restart))
                .bind(instance.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let (kind, what) = if *restart {
                    ("instance.restarted", "started again")
                } else {
                    ("instance.started", "started")
                };
                (changed, kind, format!("instance {} {what}", instance.id))
            }
            InstanceUpdate::StartFailed {
                error,
                crashes,
                next_start_at,
            } => {
                let changed = sqlx::query(
                    "UPDATE instances SET state = 'exited', crashes = ?, next_start_at = ?, \
                     last_error = ?, updated_at = UTC_TIMESTAMP(6) \
                     WHERE id = ? AND state IN ('pending', 'exited', 'running')",
                )
                .bind(crashes)
                .bind(next_start_at)
                .bind(error)
                .bind(instance.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                (
                    changed,
                    "instance.failed",
                    format!("instance {} could not start: {error}", instance.id),
                )
            }
        };
        // An instance stopped or ended meanwhile was not changed: no event says it was.
        if changed == 1 {
            events::append_in(&mut tx, kind, Some(&instance.worker), None, &message).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends instances whose container is gone from their worker (removed, or lost with a
    /// dead worker), with one event each saying why.
    pub async fn end_instances(
        &self,
        ended: &[&InstanceRecord],
        kind: &str,
        why: &str,
    ) -> Result<(), StoreError> {
        for i in ended {
            let mut tx = self.begin().await?;
            let done = sqlx::query(
                "UPDATE instances SET state = 'gone', ended_at = UTC_TIMESTAMP(6), \
                 updated_at = UTC_TIMESTAMP(6) WHERE id = ? AND ended_at IS NULL",
            )
            .bind(i.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 1 {
                let message = format!("instance {}: {why}", i.id);
                events::append_in(&mut tx, kind, Some(&i.worker), None, &message).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Removes deleted apps none of whose instances is left, with their history.
    pub async fn purge_deleted_apps(&self) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let ids: Vec<u64> = sqlx::query_scalar(
            "SELECT a.id FROM apps a WHERE a.deleting AND NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.app_id = a.id AND i.ended_at IS NULL) FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            sqlx::query("DELETE FROM instances WHERE app_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM apps WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }
}
