//! Renting and releasing workers: the operations behind the API, kept apart from HTTP so
//! the loops and tests can call them too.
//!
//! Every step is recorded before it is taken: a worker is claimed (in the database) before
//! the account is created on it, and a rental is marked releasing before its account is
//! removed. A process killed between two steps leaves a state that [`recover`] and the
//! cleanup loop finish.

use tracing::Instrument;

use crate::context::Context;
use crate::health::target_of;
use crate::model::{self, NotifyUrl, RentalStatus, TenantKey, Username};
use crate::playbook::{Playbook, PlaybookError, Vars};
use crate::ssh::SshError;
use crate::store::{NewRental, RentalRecord, RentalView, StoreError, Worker};

/// A validated rent request.
#[derive(Debug, Clone)]
pub struct RentRequest {
    /// Who the rental belongs to.
    pub tenant: String,
    /// Requested login name; one is generated if `None`.
    pub username: Option<Username>,
    /// The tenant's public key; with none, a password is generated.
    pub public_key: Option<TenantKey>,
    /// Where to POST the new connection details after a migration.
    pub notify_url: Option<NotifyUrl>,
}

/// A rental just made.
#[derive(Debug, Clone)]
pub struct Rented {
    pub rental: RentalView,
    /// The generated password, shown to the client once and stored only as a hash.
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RentError {
    #[error("no alive, free worker is available")]
    NoFreeWorker,
    #[error(transparent)]
    UsernameTaken(StoreError),
    #[error("could not create the account on {worker}: {reason}")]
    Provisioning { worker: String, reason: String },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken(_) => RentError::UsernameTaken(e),
            other => RentError::Store(other),
        }
    }
}

/// Rents a worker: claims one atomically, creates the tenant's account on it, and returns
/// the connection details. On a provisioning failure the half-made account is removed (or
/// left for the cleanup loop if the worker is unreachable) and the worker is not left
/// allocated to the failed rental.
///
/// The work runs in its own task: a client that disconnects mid-rent does not cut a
/// provisioning in half.
pub async fn rent(ctx: &Context, request: RentRequest) -> Result<Rented, RentError> {
    let ctx = ctx.clone();
    let id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("rent", rental_id = %id, worker = tracing::field::Empty);
    let started = std::time::Instant::now();
    let result = tokio::spawn(rent_inner(ctx, id, request).instrument(span))
        .await
        .unwrap_or_else(|e| {
            Err(RentError::Store(StoreError::Query(sqlx::Error::Protocol(
                format!("rent task failed: {e}"),
            ))))
        });
    let outcome = match &result {
        Ok(_) => "created",
        Err(RentError::NoFreeWorker) => "no_free_worker",
        Err(_) => "failed",
    };
    metrics::counter!(crate::metrics::names::RENTS, "outcome" => outcome).increment(1);
    metrics::histogram!(crate::metrics::names::RENT_DURATION)
        .record(started.elapsed().as_secs_f64());
    result
}

async fn rent_inner(ctx: Context, id: String, request: RentRequest) -> Result<Rented, RentError> {
    let username = request.username.unwrap_or_else(Username::generate);
    let password = request.public_key.is_none().then(model::generate_password);
    let new = NewRental {
        id: id.clone(),
        tenant: request.tenant,
        username: username.to_string(),
        public_key: request.public_key.map(|k| k.as_str().to_owned()),
        password_hash: password.as_deref().map(model::hash_password),
        notify_url: request.notify_url.map(|u| u.as_str().to_owned()),
    };
    let Some((record, worker)) = ctx.store.claim_worker_for(&new).await? else {
        tracing::info!("no free worker");
        return Err(RentError::NoFreeWorker);
    };
    tracing::Span::current().record("worker", worker.name.as_str());
    tracing::info!(username = %record.username, "worker claimed; provisioning");

    if let Err(e) = provision(&ctx, &record, &worker).await {
        let reason = e.to_string();
        tracing::warn!(error = %reason, "provisioning failed; rolling back");
        // Undo only what may have been done; a run that never reached the worker left
        // nothing behind, and the worker is free at once.
        let removed = !e.may_have_run() || deprovision(&ctx, &record, &worker).await.is_ok();
        ctx.store
            .fail_rent(&record.id, &worker, removed, &reason)
            .await?;
        return Err(RentError::Provisioning {
            worker: worker.name,
            reason,
        });
    }
    ctx.store
        .activate(&record.id, &worker, RentalStatus::Provisioning)
        .await?;
    tracing::info!("rental active");
    let rental = ctx
        .store
        .rental_view(&record.id)
        .await?
        .ok_or_else(|| StoreError::Query(sqlx::Error::RowNotFound))?;
    Ok(Rented { rental, password })
}

/// Creates (or converges) the rental's account on `worker`.
pub async fn provision(
    ctx: &Context,
    rental: &RentalRecord,
    worker: &Worker,
) -> Result<(), PlaybookError> {
    let result = ctx
        .executor
        .run(Playbook::CreateUser, &vars_of(rental), &target_of(worker))
        .await;
    quarantine_on_mismatch(ctx, worker, &result).await;
    result
}

/// Removes the rental's account from `worker`.
pub async fn deprovision(
    ctx: &Context,
    rental: &RentalRecord,
    worker: &Worker,
) -> Result<(), PlaybookError> {
    let vars = Vars {
        username: rental.username.clone(),
        public_key: None,
        password_hash: None,
    };
    let result = ctx
        .executor
        .run(Playbook::DeleteUser, &vars, &target_of(worker))
        .await;
    quarantine_on_mismatch(ctx, worker, &result).await;
    result
}

async fn quarantine_on_mismatch(
    ctx: &Context,
    worker: &Worker,
    result: &Result<(), PlaybookError>,
) {
    if let Err(PlaybookError::Ssh { cause: e, .. }) = result
        && let SshError::HostKeyMismatch { .. } = **e
    {
        let reason = format!("host key changed: {e}");
        if let Err(err) = ctx.store.quarantine(worker, &reason).await {
            tracing::error!(worker = %worker.name, error = %err, "could not quarantine worker");
        }
    }
}

fn vars_of(rental: &RentalRecord) -> Vars {
    Vars {
        username: rental.username.clone(),
        public_key: rental.public_key.clone(),
        password_hash: rental.password_hash.clone(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("no such rental")]
    NotFound,
    #[error("the rental is {0} and cannot be released now")]
    NotReleasable(RentalStatus),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Releases a rental: removes the tenant's account from its worker and frees the worker.
/// If the worker is down, the rental is released anyway and the cleanup loop removes the
/// account when the worker answers again (the worker stays held until then).
/// Releasing a released rental succeeds and changes nothing.
pub async fn release(ctx: &Context, id: &str, tenant: Option<&str>) -> Result<(), ReleaseError> {
    let ctx = ctx.clone();
    let (id, tenant) = (id.to_owned(), tenant.map(str::to_owned));
    let span = tracing::info_span!("release", rental_id = %id, worker = tracing::field::Empty);
    tokio::spawn(async move { release_inner(&ctx, &id, tenant.as_deref()).await }.instrument(span))
        .await
        .unwrap_or_else(|e| {
            Err(ReleaseError::Store(StoreError::Query(
                sqlx::Error::Protocol(format!("release task failed: {e}")),
            )))
        })
}

async fn release_inner(ctx: &Context, id: &str, tenant: Option<&str>) -> Result<(), ReleaseError> {
    let Some((rental, worker)) = ctx.store.begin_release(id, tenant).await? else {
        return Err(ReleaseError::NotFound);
    };
    match rental.status {
        RentalStatus::Released | RentalStatus::Failed => return Ok(()),
        RentalStatus::Releasing => {}
        other => return Err(ReleaseError::NotReleasable(other)),
    }
    let removed = match &worker {
        Some(w) => {
            tracing::Span::current().record("worker", w.name.as_str());
            match deprovision(ctx, &rental, w).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "account not removed now; cleanup will retry");
                    false
                }
            }
        }
        None => false,
    };
    ctx.store
        .finish_release(&rental.id, worker.as_ref(), removed)
        .await?;
    tracing::info!(account_removed = removed, "rental released");
    Ok(())
}

/// Finishes what a previous process left half-done: rentals caught mid-provisioning are
/// failed (their client never got an answer) and rentals caught mid-release are released;
/// in both cases the account is left for the cleanup loop to remove. Run at start, before
/// the API serves.
pub async fn recover(ctx: &Context) -> Result<usize, StoreError> {
    let mut recovered = 0;
    for rental in ctx.store.rentals_in(RentalStatus::Provisioning).await? {
        let worker = match rental.worker_id {
            Some(id) => ctx.store.worker_by_id(id).await?,
            None => None,
        };
        if let Some(worker) = worker {
            ctx.store
                .fail_rent(
                    &rental.id,
                    &worker,
                    false,
                    "interrupted mid-provisioning by a restart of orion",
                )
                .await?;
            tracing::warn!(rental_id = %rental.id, worker = %worker.name,
                "rental interrupted mid-provisioning marked failed");
            recovered += 1;
        }
    }
    for rental in ctx.store.rentals_in(RentalStatus::Releasing).await? {
        let worker = match rental.worker_id {
            Some(id) => ctx.store.worker_by_id(id).await?,
            None => None,
        };
        ctx.store
            .finish_release(&rental.id, worker.as_ref(), false)
            .await?;
        tracing::warn!(rental_id = %rental.id, "rental interrupted mid-release finished");
        recovered += 1;
    }
    Ok(recovered)
}
