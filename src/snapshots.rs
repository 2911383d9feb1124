//! Snapshots of tenants' homes: taken from the worker (a gzip'd tar streamed over SSH,
//! read as the tenant), stored in the database in chunks, and restored onto the new
//! worker when a rental moves, before it is active again.
//!
//! Why the database and not a peer worker (as Proxmox replicates to a peer node): every
//! control-plane replica reaches it, the database's own replication (Galera) keeps its
//! copies, and no worker — a machine another tenant may rent — ever holds a tenant's
//! files. The cost is the database's disk and write traffic, bounded by
//! `snapshots.max_bytes` per rental and by sending nothing when nothing changed.

use anyhow::Context as _;

use crate::context::Context;
use crate::playbook::{HomeVars, Playbook};
use crate::store::{Claim, RentalRecord, SnapshotJob};

/// Size of one stored chunk: well below MariaDB's default `max_allowed_packet` (16 MiB)
/// and small enough to keep each write, and each Galera write set, short.
const CHUNK: usize = 1 << 20;

/// The snapshot script's exit status when the home did not change since the last one.
const UNCHANGED: u32 = 10;

/// The snapshot script's exit status when the home, measured before anything is sent,
/// is over `snapshots.max_bytes` (it says `orion: size <bytes>`).
const OVER_CAP: u32 = 11;

/// Seconds the worker gives the commands run as the tenant past `snapshots.deadline`:
/// Orion gives up first and says why; the worker's own bound only ends what is left.
const WORKER_GRACE_SECS: u64 = 5;

/// What taking a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// The home is as it was at the last snapshot: nothing was sent.
    Unchanged,
    /// A new snapshot of this many bytes (compressed) is the rental's now.
    Stored(u64),
    /// The home is over `snapshots.max_bytes`: the last snapshot is kept. `streamed`:
    /// bytes received before it was refused (0 when measured before streaming, as it
    /// is unless the home grew past the cap while it was read).
    TooBig { streamed: u64 },
    /// The rental moved or ended while it was taken: it was dropped.
    Superseded,
}

/// The cap was reached mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot is over {0} bytes")]
struct TooBig(u64);

/// A snapshot being written, chunk by chunk.
struct Writing {
    id: Option<u64>,
    seq: u32,
    buf: Vec<u8>,
    bytes: u64,
}

/// The seconds the worker bounds a home playbook's tenant commands by.
fn worker_deadline(ctx: &Context) -> u64 {
    ctx.config.snapshots.deadline.as_secs_f64().ceil() as u64 + WORKER_GRACE_SECS
}

/// Takes a snapshot of the rental's home on its worker, unless nothing changed since the
/// last one. `moving`: the last snapshot of a planned move, after the tenant's sessions
/// on the worker are ended (always sent; kept if the rental is `migrating`).
///
/// Ended at `snapshots.deadline` however it is going (the tenant can stop the tar that
/// reads its home): the rental keeps its last snapshot, a `snapshot.deadline` event says
/// so, and the error is returned.
pub async fn take(ctx: &Context, job: &SnapshotJob, moving: bool) -> anyhow::Result<Taken> {
    let deadline = ctx.config.snapshots.deadline;
    let mut writing = Writing {
        id: None,
        seq: 0,
        buf: Vec::with_capacity(CHUNK),
        bytes: 0,
    };
    let taken = tokio::time::timeout(deadline, take_within(ctx, job, moving, &mut writing)).await;
    let Ok(taken) = taken else {
        // Dropped mid-way: its connection is closed, and the worker ends what is left.
        if let Some(id) = writing.id {
            ctx.store.discard_snapshot(id).await.ok();
        }
        let message = format!(
            "the snapshot of {}'s home on {} was still running after snapshots.deadline \
             ({deadline:?}, {} bytes received): ended, its last snapshot is kept",
            job.username, job.worker.name, writing.bytes
        );
        ctx.store
            .append_event(
                "snapshot.deadline",
                Some(&job.worker.name),
                Some(&job.rental_id),
                &message,
            )
            .await
            .ok();
        anyhow::bail!(message);
    };
    taken
}

/// [`take`], writing into `writing` (which the caller discards if the deadline cuts it).
async fn take_within(
    ctx: &Context,
    job: &SnapshotJob,
    moving: bool,
    writing: &mut Writing,
) -> anyhow::Result<Taken> {
    let max = ctx.config.snapshots.max_bytes.bytes();
    let vars = HomeVars {
        username: job.username.clone(),
        uid: job.uid,
        fingerprint: job.fingerprint.clone().unwrap_or_default(),
        r#final: moving,
        max_bytes: max,
        deadline: worker_deadline(ctx),
    };
    let command = ctx.executor.playbooks().render_home(
        Playbook::SnapshotHome,
        &vars,
        ctx.executor.uid_min(),
    )?;
    // A connection of its own, not a channel of the worker's watch connection: russh
    // stops reading a whole connection while one channel's reader is busy, and this
    // reader waits on the database.
    let session = ctx.ssh.connect(&job.worker.target()).await?;
    let store = &ctx.store;
    let (rental_id, worker_id) = (&job.rental_id, job.worker.id);
    let mut reading = session.exec_reading(&command).await?;
    let streamed = stream_into(store, &mut reading, writing, rental_id, worker_id, max).await;
    if let Err(e) = streamed {
        reading.close().await;
        session.close().await;
        if let Some(id) = writing.id.take() {
            store.discard_snapshot(id).await.ok();
        }
        if e.downcast_ref::<TooBig>().is_none() {
            return Err(e.context("Failed to stream the home's snapshot"));
        }
        let seen = fingerprint(&reading.stderr_so_far()).unwrap_or_default();
        let message = format!(
            "the home of {} on {} grew over snapshots.max_bytes ({max} bytes) while it was \
             read: its last snapshot is kept, newer files would be lost in a failover",
            job.username, job.worker.name
        );
        over_cap(store, rental_id, &seen, &job.worker.name, &message).await?;
        return Ok(Taken::TooBig {
            streamed: writing.bytes,
        });
    }
    let out = reading.finish();
    session.close().await;
    let fingerprint = fingerprint(&out.stderr);
    match out.exit_status {
        Some(UNCHANGED) if !moving => return Ok(Taken::Unchanged),
        Some(OVER_CAP) if writing.bytes == 0 => {
            let size = out
                .stderr
                .lines()
                .find_map(|l| l.strip_prefix("orion: size "))
                .unwrap_or("?")
                .trim()
                .to_owned();
            let message = format!(
                "the home of {} on {} is {size} bytes, over snapshots.max_bytes ({max} \
                 bytes): measured before streaming, nothing was sent; its last snapshot is \
                 kept, newer files would be lost in a failover",
                job.username, job.worker.name
            );
            let seen = fingerprint.unwrap_or_default();
            over_cap(store, rental_id, &seen, &job.worker.name, &message).await?;
            return Ok(Taken::TooBig { streamed: 0 });
        }
        Some(0) => {}
        _ => {
            if let Some(id) = writing.id {
                store.discard_snapshot(id).await.ok();
            }
            anyhow::bail!(
                "snapshot of {} on {} failed ({}): {}",
                job.username,
                job.worker.name,
                out.exit_status
                    .map_or("no exit status".to_owned(), |s| format!("exit {s}")),
                out.stderr.trim()
            );
        }
    }
    let Some(fingerprint) = fingerprint else {
        anyhow::bail!("the snapshot script said no fingerprint");
    };
    let last = std::mem::take(&mut writing.buf);
    if !last.is_empty() || writing.id.is_none() {
        store_chunk(store, writing, rental_id, worker_id, &last).await?;
    }
    let id = writing.id.expect("a chunk was stored");
    let kept = store
        .finish_snapshot(
            id,
            rental_id,
            worker_id,
            &fingerprint,
            writing.bytes,
            moving,
        )
        .await?;
    Ok(if kept {
        tracing::debug!(rental_id = %rental_id, bytes = writing.bytes, "snapshot stored");
        Taken::Stored(writing.bytes)
    } else {
        Taken::Superseded
    })
}

/// Records that the home (of fingerprint `seen`) is over the cap, with one event when it
/// goes over, so that it is not looked at again until it changes.
async fn over_cap(
    store: &crate::store::Store,
    rental_id: &str,
    seen: &str,
    worker: &str,
    message: &str,
) -> anyhow::Result<()> {
    if store
        .snapshot_oversize(rental_id, seen, worker, message)
        .await?
    {
        tracing::warn!(rental_id = %rental_id, "{message}");
    }
    Ok(())
}

/// Stores the snapshot command's stdout in chunks as it comes.
async fn stream_into(
    store: &crate::store::Store,
    reading: &mut crate::ssh::Reading,
    writing: &mut Writing,
    rental_id: &str,
    worker_id: u64,
    max: u64,
) -> anyhow::Result<()> {
    while let Some(data) = reading.next().await? {
        writing.bytes += data.len() as u64;
        if writing.bytes > max {
            return Err(TooBig(max).into());
        }
        writing.buf.extend_from_slice(&data);
        while writing.buf.len() >= CHUNK {
            let rest = writing.buf.split_off(CHUNK);
            let chunk = std::mem::replace(&mut writing.buf, rest);
            store_chunk(store, writing, rental_id, worker_id, &chunk).await?;
        }
    }
    Ok(())
}

async fn store_chunk(
    store: &crate::store::Store,
    writing: &mut Writing,
    rental_id: &str,
    worker_id: u64,
    chunk: &[u8],
) -> anyhow::Result<()> {
    let id = match writing.id {
        Some(id) => id,
        None => {
            let id = store.begin_snapshot(rental_id, worker_id).await?;
            writing.id = Some(id);
            id
        }
    };
    store.put_snapshot_chunk(id, writing.seq, chunk).await?;
    writing.seq += 1;
    Ok(())
}

/// The fingerprint the script reported on stderr.
fn fingerprint(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("orion: fingerprint "))
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty() && f.len() <= 64)
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Size of the snapshot restored (compressed).
    pub bytes: u64,
    /// When it was taken.
    pub taken_at: chrono::DateTime<chrono::Utc>,
    /// What could not be restored (the archive's own faults), if anything.
    pub incomplete: Option<String>,
}

/// Restores the rental's last snapshot into its new account on `claim`'s worker. `None`
/// if it has no snapshot. An archive that can be only partly restored (a crafted one)
/// still succeeds, saying what was left out; a worker that refuses or cannot be
/// reached fails the restore (and the move is tried again).
pub async fn restore(
    ctx: &Context,
    rental: &RentalRecord,
    claim: &Claim,
) -> anyhow::Result<Option<Restored>> {
    let Some(snapshot) = ctx.store.latest_snapshot(&rental.id).await? else {
        return Ok(None);
    };
    let vars = HomeVars {
        username: rental.username.clone(),
        uid: claim.uid,
        fingerprint: String::new(),
        r#final: false,
        max_bytes: 0,
        deadline: worker_deadline(ctx),
    };
    let command = ctx.executor.playbooks().render_home(
        Playbook::RestoreHome,
        &vars,
        ctx.executor.uid_min(),
    )?;
    let store = ctx.store.clone();
    let id = snapshot.id;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = sent.clone();
    // Chunk by chunk from the database, never the whole archive in memory.
    let source = futures::stream::try_unfold(0u32, move |seq| {
        let (store, counted) = (store.clone(), counted.clone());
        async move {
            let chunk = store
                .snapshot_chunk(id, seq)
                .await
                .context("Failed to read a snapshot chunk")?;
            if let Some(data) = &chunk {
                counted.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(chunk.map(|data| (data, seq + 1)))
        }
    });
    // Bounded as a snapshot is: the tenant may stop what unpacks its home (it runs as the
    // tenant), and the move is tried again rather than held.
    let deadline = ctx.config.snapshots.deadline;
    let out = tokio::time::timeout(deadline, async {
        let session = ctx.ssh.session(&claim.worker.target()).await?;
        let out = session.exec_writing(&command, source).await;
        session.close().await;
        out
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the restore on {} was still running after snapshots.deadline ({deadline:?})",
            claim.worker.name
        )
    })?
    .context("Failed to stream the snapshot to the new worker")?;
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    if sent != snapshot.bytes {
        // Chunks missing (the snapshot was dropped meanwhile): the move is tried again
        // rather than giving the tenant part of a home.
        anyhow::bail!(
            "the snapshot sent to {} was {sent} bytes of {}: not whole",
            claim.worker.name,
            snapshot.bytes
        );
    }
    if !out.success() {
        anyhow::bail!(
            "restore on {} failed ({}): {}",
            claim.worker.name,
            out.exit_status
                .map_or("no exit status".to_owned(), |s| format!("exit {s}")),
            out.stderr.trim()
        );
    }
    let incomplete = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("orion: restore incomplete: "))
        .map(|s| s.trim().to_owned());
    Ok(Some(Restored {
        bytes: snapshot.bytes,
        taken_at: snapshot.taken_at,
        incomplete,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_read_from_its_own_line() {
        assert_eq!(
            fingerprint("tar: x\norion: fingerprint 0123abcd\n").as_deref(),
            Some("0123abcd")
        );
        assert_eq!(fingerprint("orion: fingerprint \n"), None);
    }
}
