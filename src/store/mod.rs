//! MariaDB through sqlx: the one place Orion's state lives.
//!
//! The API and the loops only talk to the database through [`Store`]. Each method is one
//! short transaction, so that two Orion tasks (or two Orion processes) can never both
//! believe they hold the same worker.

mod apps;
mod claims;
mod cleanups;
mod endpoints;
mod events;
mod host_keys;
mod idempotency;
mod inventory;
mod leases;
mod placements;
mod probes;
mod rentals;
mod service;
mod snapshots;
mod tokens;
mod workers;

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{Connection, Executor};

pub use apps::{AppChange, AppRecord, InstanceRecord, InstanceUpdate, NewApp};
pub use claims::Constraints;
pub use cleanups::Cleanup;
pub use endpoints::EndpointTarget;
pub use events::Event;
pub use idempotency::{KeyClaim, KeyHold};
pub use leases::{Fence, LOOPS, Lease};
pub use placements::PlacementRecord;
pub use probes::ProbeRecord;
pub use rentals::{Claim, NewRental, RentalDetail, RentalRecord};
pub use snapshots::{SnapshotInfo, SnapshotJob};
pub use tokens::TokenRecord;
pub use workers::{LabelSet, Occupant, Worker, WorkerCounts};

/// Failures of the store, split by what a caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded: retry later, answer 503.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A live rental already uses this username.
    #[error("username `{0}` is already used by another rental")]
    UsernameTaken(String),
    /// A live app (of any tenant: the name is its address) already has this name.
    #[error("the app name `{0}` is taken")]
    NameTaken(String),
    /// A new tenant's name differs from an existing tenant's only in case: tenants are
    /// told apart byte for byte, so two that look alike would be two tenants.
    #[error("tenant `{0}` exists; a tenant name may not differ from another only in case")]
    TenantLookalike(String),
    /// The tenant already holds as many live rentals as it may.
    #[error("the tenant already holds its limit of {limit} live rentals")]
    QuotaExceeded { limit: u32 },
    /// The tenant's apps would ask for more instances than it may have.
    #[error(
        "the tenant's apps may ask for {limit} instances in all; {others} are already asked for"
    )]
    InstanceQuota { limit: u32, others: u32 },
    /// This process no longer leads the loops (its lease expired or was taken over):
    /// a loop's write is refused rather than made with an old epoch.
    #[error("{holder} does not lead the loops (epoch {epoch}): write refused")]
    Fenced { holder: String, epoch: u64 },
    /// An edit of the inventory that cannot be made (invalid, or no such worker).
    #[error(transparent)]
    Inventory(#[from] crate::inventory::EditError),
    /// Something the store guarantees did not hold: a bug.
    #[error("store invariant broken: {0}")]
    Invariant(String),
    /// Anything else: a bug or a schema mismatch.
    #[error("database error: {0}")]
    Query(sqlx::Error),
    /// Another `orion` process held the schema migration lock for a whole minute.
    #[error(
        "timed out waiting for another orion process's schema migration (table orion_schema_lock)"
    )]
    MigrationLockTimeout,
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(ref db)
                if db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|e| is_transient(e.number())) =>
            {
                StoreError::Unavailable(e)
            }
            other => StoreError::Query(other),
        }
    }
}

/// MariaDB error numbers that mean "try again", not "you are wrong": too many
/// connections (1040), server shutting down (1053), lock wait timeout (1205), deadlock
/// (1213), read-only during failover (1290).
fn is_transient(number: u16) -> bool {
    matches!(number, 1040 | 1053 | 1205 | 1213 | 1290)
}

/// Whether an error is a deadlock (1213) or a lock wait timeout (1205): the transaction
/// was rolled back and may simply be run again.
fn is_conflict(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(sqlx::Error::Database(db))
        if db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1205 | 1213)))
}

/// How many times a transaction that lost a deadlock is run again.
const CONFLICT_RETRIES: usize = 5;

/// Runs `transaction` (one whole transaction, from `begin` to `commit`) and runs it again,
/// up to [`CONFLICT_RETRIES`] times, when InnoDB picks it as a deadlock's victim or its
/// lock wait times out. InnoDB has already rolled the loser back and the winner holds the
/// locks, so it is retried at once: a fixed count without delay is all this needs, which
/// is why no retry crate (`backon`) is used here.
async fn retry_on_conflict<T, F, Fut>(mut transaction: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match transaction().await {
            Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "transaction lost a deadlock, running it again");
            }
            other => return other,
        }
    }
}

/// Takes the tenant's row lock (making the row if needed): the tenant's rents, and its
/// apps' creations and changes, are then counted against its quotas one at a time.
async fn lock_tenant(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    tenant: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tenants (name, created_at) VALUES (?, UTC_TIMESTAMP(6)) \
         ON DUPLICATE KEY UPDATE name = name",
    )
    .bind(tenant)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Handle on the database, cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: MySqlPool,
    /// Set on the store the control loops use: every transaction first proves this
    /// process still leads ([`leases::pass_fence`]).
    fence: Option<std::sync::Arc<Fence>>,
}

/// Name of the MariaDB advisory lock held while migrating, so that only one `orion`
/// process changes the schema at a time.
/// How long a process waits for another's schema migration before giving up.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(60);
/// How long a migration lock lasts if its holder dies without letting it go. Orion's
/// migrations take well under a second; one that could take longer is to be run alone
/// (`orion migrate`) before the replicas start.
const MIGRATION_LOCK_LEASE: Duration = Duration::from_secs(120);

impl Store {
    /// Opens a bounded pool. Connections are made on demand, so a database that is down
    /// at this moment is not an error here; the first query reports it.
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options: MySqlConnectOptions = url.parse().map_err(StoreError::Query)?;
        let options = options.timezone(Some("+00:00".to_owned()));
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(true)
            .connect_lazy_with(options);
        Ok(Self { pool, fence: None })
    }

    /// The same database, every write of which first proves that this process leads the
    /// loops with the epoch in `fence`: the store the control loops use.
    pub fn fenced(&self, fence: Fence) -> Self {
        Self {
            pool: self.pool.clone(),
            fence: Some(std::sync::Arc::new(fence)),
        }
    }

    /// Starts a transaction; on a fenced store, it first passes the fence.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::MySql>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(fence) = &self.fence {
            leases::pass_fence(&mut tx, fence).await?;
        }
        Ok(tx)
    }

    /// Runs one write statement; on a fenced store, in a transaction that first passes
    /// the fence.
    async fn write<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
    ) -> Result<sqlx::mysql::MySqlQueryResult, StoreError> {
        if self.fence.is_none() {
            return Ok(query.execute(&self.pool).await?);
        }
        let mut tx = self.begin().await?;
        let done = query.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Applies the schema in `migrations/`, one process at a time. sqlx's own migration
    /// lock does not hold on MariaDB, and `GET_LOCK` holds on one server only (each
    /// Galera node has its own), so the lock is a row: taken by an update that only
    /// one process can win, on any node (two nodes' updates of the row conflict, and
    /// Galera refuses one at commit). A lock left by a process that died expires.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS orion_schema_lock (
                 id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
                 holder VARCHAR(100) NULL,
                 expires_at DATETIME(3) NULL
             ) ENGINE=InnoDB",
        )
        .await?;
        conn.execute("INSERT IGNORE INTO orion_schema_lock (id) VALUES (1)")
            .await?;
        let holder = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let deadline = tokio::time::Instant::now() + MIGRATION_LOCK_WAIT;
        loop {
            let taken = sqlx::query(
                "UPDATE orion_schema_lock
                 SET holder = ?, expires_at = NOW(3) + INTERVAL ? SECOND
                 WHERE id = 1 AND (holder IS NULL OR expires_at < NOW(3))",
            )
            .bind(&holder)
            .bind(MIGRATION_LOCK_LEASE.as_secs())
            .execute(&mut *conn)
            .await;
            match taken.map_err(StoreError::from) {
                Ok(done) if done.rows_affected() == 1 => break,
                Ok(_) => {}
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::MigrationLockTimeout);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_locking(false);
        let result = migrator.run(&mut *conn).await;
        let released = sqlx::query(
            "UPDATE orion_schema_lock SET holder = NULL, expires_at = NULL \
             WHERE id = 1 AND holder = ?",
        )
        .bind(&holder)
        .execute(&mut *conn)
        .await;
        // The migration's own failure says more than the release's.
        result?;
        released?;
        Ok(())
    }

    /// True when a trivial query succeeds: the database is reachable and answering.
    pub async fn ping(&self) -> bool {
        match self.pool.acquire().await {
            Ok(mut conn) => conn.ping().await.is_ok(),
            Err(_) => false,
        }
    }
}
