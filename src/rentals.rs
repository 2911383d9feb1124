//! Renting and releasing workers: the operations behind the API, kept apart from HTTP so
//! the loops and tests can call them too.
//!
//! Every step is recorded before it is taken: a worker is claimed (in the database) before
//! the account is created on it, and a rental is marked releasing before its account is
//! removed. A process killed between two steps leaves a state that the cleanup loop
//! finishes once it is older than any rent or release takes
//! ([`resolve_stuck_provisioning`], [`finish_stuck_releases`]).

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use crate::context::Context;
use crate::model::{self, NotifyUrl, RentalStatus, TenantKey, Username};
use crate::playbook::{Playbook, PlaybookError, Vars};
use crate::store::{Claim, NewRental, RentalDetail, RentalRecord, StoreError, Worker};

mod rules;
pub use rules::{placement, quota, renew_ttl, rent_ttl, stands_for_its_key};

/// Workers a rent tries when provisioning fails before anything ran on the worker (a
/// connection that died unnoticed, a worker that went away since its last probe).
const RENT_ATTEMPTS: usize = 3;

/// Tries at a store call a rent must not lose, through a database blip of about a second.
const BLIP_ATTEMPTS: u32 = 4;

/// A validated rent request.
#[derive(Debug, Clone)]
pub struct RentRequest {
    /// The new rental's id (`None`: a new one). Chosen by the caller when it must know it
    /// before the rent ends (an `Idempotency-Key`).
    pub id: Option<String>,
    /// Who the rental belongs to.
    pub tenant: String,
    /// Requested login name; one is generated if `None`.
    pub username: Option<Username>,
    /// The tenant's public key; with none, a password is generated.
    pub public_key: Option<TenantKey>,
    /// Where to POST the new connection details after a migration.
    pub notify_url: Option<NotifyUrl>,
    /// The token the rental is made with (`None` for the admin token).
    pub token_id: Option<String>,
    /// How long the rental lives unless renewed (`None`: until released).
    pub ttl: Option<Duration>,
    /// Most live rentals the tenant may hold (`None`: no limit).
    pub max_rentals: Option<u32>,
    /// The request's `Idempotency-Key`, held by this process: the rental becomes active
    /// only while it still is.
    pub key: Option<crate::store::KeyHold>,
    /// Where it may be placed (site, labels, preferred site).
    pub constraints: crate::store::Constraints,
}

/// A rental just made.
#[derive(Debug, Clone)]
pub struct Rented {
    /// The rental as it is now, for the API to show.
    pub rental: RentalDetail,
    /// The generated password, shown to the client once and stored only as a hash.
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RentError {
    /// Nothing free matches `wanted`.
    #[error("no alive, free worker is available")]
    NoFreeWorker { wanted: crate::store::Constraints },
    #[error("the tenant already holds its limit of {0} live rentals")]
    QuotaExceeded(u32),
    #[error(transparent)]
    UsernameTaken(StoreError),
    #[error("could not create the account on {worker}: {reason}")]
    Provisioning { worker: String, reason: String },
    /// The worker holds an account or group of the asked-for name that is not Orion's:
    /// the request's fault (another name works), never the worker's.
    #[error(
        "the username `{username}` is taken on worker {worker} by an account or group that is not a rental's; choose another"
    )]
    NameTakenOnWorker { worker: String, username: String },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken(_) => RentError::UsernameTaken(e),
            StoreError::QuotaExceeded { limit } => RentError::QuotaExceeded(limit),
            other => RentError::Store(other),
        }
    }
}

/// How long a rent or a release may run before it counts as cut short: the rent's own
/// deadline and some slack. Past it the loops end it ([`resolve_stuck_provisioning`],
/// [`finish_stuck_releases`]), and a retry under the same `Idempotency-Key` runs again.
pub fn cut_short_after(ctx: &Context) -> Duration {
    ctx.config.rent_deadline() + Duration::from_secs(30)
}

/// Whether the rental `id`, made under an `Idempotency-Key`, stands for its key
/// ([`stands_for_its_key`]); false when there is no such rental.
pub async fn made_for_key(ctx: &Context, id: &str) -> Result<bool, StoreError> {
    Ok(ctx
        .store
        .rental(id)
        .await?
        .is_some_and(|r| stands_for_its_key(r.status)))
}

/// Ends what a keyed rent that was cut short left half-made (its rental still
/// provisioning), so that it can never come to life beside the retry's; false if it
/// came to life meanwhile.
pub async fn abandon_keyed_rent(ctx: &Context, id: &str) -> Result<bool, StoreError> {
    ctx.store
        .abandon_rent(
            id,
            "its request's process stopped; the rent runs again under its Idempotency-Key",
        )
        .await
}

/// The rental an `Idempotency-Key` stands for, as it is now, for the retry to answer;
/// `None` if it is gone, or is not `tenant`'s.
pub async fn replay(
    ctx: &Context,
    id: &str,
    tenant: &str,
) -> Result<Option<RentalDetail>, StoreError> {
    Ok(ctx
        .store
        .rental_detail(id)
        .await?
        .filter(|d| d.rental.tenant == tenant))
}

/// Rents a worker: claims one atomically, creates the tenant's account on it, and returns
/// the connection details. On a provisioning failure the half-made account is removed (or
/// left for the cleanup loop if the worker is unreachable) and the worker is not left
/// allocated to the failed rental.
///
/// The work runs in its own task, tracked in [`Context::tasks`]: a client that
/// disconnects mid-rent does not cut a provisioning in half, and a shutdown waits for it.
pub async fn rent(ctx: &Context, request: RentRequest) -> Result<Rented, RentError> {
    rent_and_then(ctx, request, |_| async {}).await
}

/// [`rent`], then `then` in the same task, given the rental's id if it was made: what
/// must follow the rent even when its client has gone away (the record of its
/// `Idempotency-Key`, which a retry would otherwise wait out).
pub async fn rent_and_then<T, F>(
    ctx: &Context,
    request: RentRequest,
    then: T,
) -> Result<Rented, RentError>
where
    T: FnOnce(Option<String>) -> F + Send + 'static,
    F: Future<Output = ()> + Send,
{
    let ctx = ctx.clone();
    let id = request
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = tracing::info_span!("rent", rental_id = %id, worker = tracing::field::Empty);
    let tasks = ctx.tasks.clone();
    tasks
        .spawn(async move {
            let started = std::time::Instant::now();
            let rented = rent_inner(ctx, id, request).instrument(span).await;
            let outcome = match &rented {
                Ok(_) => "created",
                Err(RentError::NoFreeWorker { .. }) => "no_free_worker",
                Err(RentError::QuotaExceeded(_)) => "quota_exceeded",
                Err(_) => "failed",
            };
            metrics::counter!(crate::metrics::names::RENTS, "outcome" => outcome).increment(1);
            metrics::histogram!(crate::metrics::names::RENT_DURATION)
                .record(started.elapsed().as_secs_f64());
            then(rented.as_ref().ok().map(|r| r.rental.rental.id.clone())).await;
            rented
        })
        .await
        .unwrap_or_else(|e| {
            Err(RentError::Store(StoreError::Invariant(format!(
                "rent task failed: {e}"
            ))))
        })
}

async fn rent_inner(ctx: Context, id: String, request: RentRequest) -> Result<Rented, RentError> {
    let username = request.username.unwrap_or_else(Username::generate);
    let password = request.public_key.is_none().then(model::generate_password);
    // Thousands of SHA-512 rounds: off the async threads, so that a burst of rents
    // does not stall every other request while it hashes.
    let password_hash = match password.clone() {
        Some(p) => Some(
            tokio::task::spawn_blocking(move || model::hash_password(&p))
                .await
                .map_err(|e| StoreError::Invariant(format!("password hashing failed: {e}")))?,
        ),
        None => None,
    };
    let mut new = NewRental {
        id,
        tenant: request.tenant,
        token_id: request.token_id,
        username: username.to_string(),
        public_key: request.public_key.map(|k| k.as_str().to_owned()),
        password_hash,
        notify_url: request.notify_url.map(|u| u.as_str().to_owned()),
        ttl: request.ttl,
        max_rentals: request.max_rentals,
        endpoint_ports: ctx.config.gateway.ports.clone(),
        constraints: request.constraints,
    };
    let uid_min = ctx.executor.uid_min();
    let mut tried = Vec::new();
    let mut last_failure = None;
    let (record, claim) = loop {
        let Some((record, claim)) = ctx.store.claim_worker_for(&new, uid_min, &tried).await? else {
            tracing::info!(tried = tried.len(), "no free worker");
            return Err(last_failure.unwrap_or_else(|| RentError::NoFreeWorker {
                wanted: new.constraints.clone(),
            }));
        };
        let worker = &claim.worker;
        tracing::Span::current().record("worker", worker.name.as_str());
        tracing::info!(username = %record.username, uid = claim.uid, "worker claimed; provisioning");
        let Err(e) = provision(&ctx, &record, &claim).await else {
            break (record, claim);
        };
        let reason = e.to_string();
        tracing::warn!(error = %reason, "provisioning failed; rolling back");
        // Undo only what may have been done; a run that never reached the worker left
        // nothing behind, and the worker is free at once.
        let removed = !e.may_have_run()
            || deprovision(&ctx, &record.username, Some(claim.uid), worker)
                .await
                .is_ok();
        ctx.store
            .fail_rent(&record.id, worker, removed, &reason)
            .await?;
        tried.push(worker.id);
        if e.is_name_taken() {
            return Err(RentError::NameTakenOnWorker {
                worker: worker.name.clone(),
                username: record.username.clone(),
            });
        }
        let failure = RentError::Provisioning {
            worker: claim.worker.name.clone(),
            reason,
        };
        // Only a worker that could not be reached is worth replacing by another; a
        // playbook that ran, or that cannot run anywhere, fails the rent.
        let unreached = matches!(e, PlaybookError::Ssh { .. }) && !e.may_have_run();
        if !unreached || tried.len() >= RENT_ATTEMPTS {
            return Err(failure);
        }
        last_failure = Some(failure);
        // Nothing ran on that worker: another free one, under a new rental id (the failed
        // attempt stays on record).
        new.id = uuid::Uuid::new_v4().to_string();
        tracing::info!(rental_id = %new.id, "trying another worker");
    };
    activate_rent(&ctx, &record, &claim, request.key.as_ref()).await?;
    tracing::info!("rental active");
    // The rental is active: its view is read back through a blip rather than answering
    // an error for a rental that exists.
    let rental = through_blip("read the new rental back", || {
        ctx.store.rental_detail(&record.id)
    })
    .await?
    .ok_or_else(|| StoreError::Invariant("an active rental has no row".into()))?;
    Ok(Rented { rental, password })
}

/// Runs a store call again through a short database blip (`BLIP_ATTEMPTS` tries,
/// 200 ms, 400 ms, 800 ms apart): for the writes and reads a rent must not lose once its
/// account exists.
async fn through_blip<T, F, Fut>(what: &str, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if attempt + 1 < BLIP_ATTEMPTS => {
                attempt += 1;
                tracing::warn!(error = %e, "cannot {what}; retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// Records that a new rental's account exists: the client gets its 201 only once this is
/// written. Retried through a short database blip; if it still cannot be written, the
/// client gets an error and the rental stays `provisioning` until
/// [`resolve_stuck_provisioning`] fails it and the cleanup loop removes the account. If
/// the rental was failed meanwhile (by that very resolver), the account is removed now.
async fn activate_rent(
    ctx: &Context,
    record: &RentalRecord,
    claim: &Claim,
    key: Option<&crate::store::KeyHold>,
) -> Result<(), RentError> {
    let activated = through_blip("record the activation", || {
        ctx.store
            .activate(&record.id, &claim.worker, RentalStatus::Provisioning, key)
    })
    .await
    .inspect_err(|e| {
        tracing::error!(error = %e,
            "cannot record the activation; the loops will fail the rental and remove its account");
    })?;
    if activated {
        return Ok(());
    }
    tracing::warn!("the rental was ended while its account was made; removing the account");
    let removed = deprovision(ctx, &record.username, Some(claim.uid), &claim.worker)
        .await
        .is_ok();
    if !removed {
        ctx.store
            .orphan_placement(&record.id, &claim.worker)
            .await?;
    }
    Err(RentError::Provisioning {
        worker: claim.worker.name.clone(),
        reason: "the rental was ended before its account was ready".into(),
    })
}

/// Creates (or converges) the rental's account on the claimed worker, with the uid it
/// was given there.
pub async fn provision(
    ctx: &Context,
    rental: &RentalRecord,
    claim: &Claim,
) -> Result<(), PlaybookError> {
    let vars = Vars {
        username: rental.username.clone(),
        uid: Some(claim.uid),
        public_key: rental.public_key.clone(),
        password_hash: rental.password_hash.clone(),
    };
    let worker = &claim.worker;
    // The tenant's client trusts the worker through Orion's CA: its certificate must be
    // there before the tenant logs in (normally the cleanup loop installed it already).
    if let Some(ca) = &ctx.host_ca
        && let Err(e) = ca
            .ensure_certificate(&ctx.executor, &ctx.store, &ctx.config, worker)
            .await
    {
        tracing::warn!(worker = %worker.name, error = format!("{e:#}"),
            "no host certificate on the worker: the tenant's client will not trust it by the CA");
    }
    let result = ctx
        .executor
        .run(Playbook::CreateUser, &vars, &worker.target())
        .await;
    on_playbook_result(ctx, worker, &result).await;
    result
}

/// Removes an account from `worker`: every process of its uid, its keys, its home. The
/// one removal path, for releases, failed rents and the cleanup loop alike. `uid` is
/// `None` only for an account made before Orion allocated uids.
pub async fn deprovision(
    ctx: &Context,
    username: &str,
    uid: Option<u32>,
    worker: &Worker,
) -> Result<(), PlaybookError> {
    let vars = Vars {
        username: username.to_owned(),
        uid,
        public_key: None,
        password_hash: None,
    };
    let result = ctx
        .executor
        .run(Playbook::DeleteUser, &vars, &worker.target())
        .await;
    on_playbook_result(ctx, worker, &result).await;
    result
}

/// What a failed playbook says about its worker: a changed host key or an account that
/// is not Orion's takes the worker out of service until an operator looks (quarantine,
/// with an event), so nothing is provisioned next to a stranger's account.
async fn on_playbook_result(ctx: &Context, worker: &Worker, result: &Result<(), PlaybookError>) {
    let reason = match result {
        Err(PlaybookError::Ssh { cause: e, .. }) if e.is_host_key_mismatch() => {
            format!("host key changed: {e}")
        }
        // The name asked for is taken on the worker: the request's fault. Said, and the
        // worker stays in service (one rent per worker must not take the fleet out).
        Err(e) if e.is_name_taken() => {
            tracing::warn!(worker = %worker.name, error = %e, "the name asked for is taken on the worker");
            let _ = ctx
                .store
                .append_event(
                    "account.name_taken",
                    Some(&worker.name),
                    None,
                    &e.to_string(),
                )
                .await;
            return;
        }
        Err(e @ PlaybookError::Refused { .. }) => {
            tracing::error!(worker = %worker.name, error = %e, "playbook refused");
            let _ = ctx
                .store
                .append_event("account.refused", Some(&worker.name), None, &e.to_string())
                .await;
            e.to_string()
        }
        _ => return,
    };
    if let Err(err) = ctx.store.quarantine(worker, &reason).await {
        tracing::error!(worker = %worker.name, error = %err, "could not quarantine worker");
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
/// Releasing a released rental succeeds and changes nothing. Like a rent, it runs in its
/// own tracked task.
pub async fn release(ctx: &Context, id: &str, tenant: Option<&str>) -> Result<(), ReleaseError> {
    let ctx = ctx.clone();
    let (id, tenant) = (id.to_owned(), tenant.map(str::to_owned));
    let span = tracing::info_span!("release", rental_id = %id, worker = tracing::field::Empty);
    let tasks = ctx.tasks.clone();
    tasks
        .spawn(async move { release_inner(&ctx, &id, tenant.as_deref()).await }.instrument(span))
        .await
        .unwrap_or_else(|e| {
            Err(ReleaseError::Store(StoreError::Invariant(format!(
                "release task failed: {e}"
            ))))
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
            let uid = ctx.store.live_uid(&rental.id, w.id).await?;
            match deprovision(ctx, &rental.username, uid, w).await {
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

/// Fails rentals left `provisioning` past any rent's deadline: their client got an error
/// (the activation could not be recorded) or its process died. The account, if made,
/// becomes a leftover that the cleanup loop removes. Returns how many were failed.
pub async fn resolve_stuck_provisioning(ctx: &Context) -> Result<usize, StoreError> {
    let after = cut_short_after(ctx);
    let mut failed = 0;
    for rental in ctx
        .store
        .stuck_in(RentalStatus::Provisioning, after)
        .await?
    {
        let Some(worker) = (match rental.worker_id {
            Some(id) => ctx.store.worker_by_id(id).await?,
            None => None,
        }) else {
            continue;
        };
        ctx.store
            .fail_rent(
                &rental.id,
                &worker,
                false,
                "stuck in provisioning: its activation was never recorded",
            )
            .await?;
        tracing::warn!(rental_id = %rental.id, worker = %worker.name,
            "rental stuck in provisioning failed; its account will be removed");
        failed += 1;
    }
    Ok(failed)
}

/// Releases every live rental whose time is up, with a `rental.expired` event. Returns
/// how many were released; one that cannot be released now (mid-move) is retried at the
/// next pass.
pub async fn release_expired(ctx: &Context) -> Result<usize, StoreError> {
    let mut released = 0;
    for rental in ctx.store.expired_rentals().await? {
        match release(ctx, &rental.id, None).await {
            Ok(()) => {
                ctx.store
                    .append_event(
                        "rental.expired",
                        None,
                        Some(&rental.id),
                        "its time was up; released",
                    )
                    .await?;
                released += 1;
            }
            Err(ReleaseError::Store(e)) => return Err(e),
            Err(e) => {
                tracing::info!(rental_id = %rental.id, error = %e, "expired rental not released yet")
            }
        }
    }
    Ok(released)
}

/// Finishes releases left half-done by a process that stopped (or died) mid-release:
/// rentals `releasing` for longer than any release takes are released, their account
/// left for the cleanup loop to remove. Only rentals that old: with several Orion
/// processes, a younger one may be another process's release in progress. (Rents cut
/// short are [`resolve_stuck_provisioning`]'s.) Returns how many were finished.
pub async fn finish_stuck_releases(ctx: &Context) -> Result<usize, StoreError> {
    let after = cut_short_after(ctx);
    let mut recovered = 0;
    for rental in ctx.store.stuck_in(RentalStatus::Releasing, after).await? {
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
