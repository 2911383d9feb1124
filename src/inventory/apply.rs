//! The live inventory: workers added, changed and retired while Orion runs.
//!
//! Three ways in, one way through ([`crate::store::Store::apply_inventory`]): the
//! inventory file (at start when it changed since it was last applied, and on `SIGHUP`),
//! a whole inventory sent to the API (`orion inventory apply`), and one worker at a time
//! (`POST`/`PATCH`/`DELETE /api/workers/{name}`). Each is validated as a whole before
//! anything is written, and written in one transaction with an event per worker. A new
//! worker is probed at once; a retired one with a tenant keeps it until the migration
//! loop has moved it (a planned move: its home's last state is taken there first).

use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use super::{Change, EditError, Inventory};
use crate::context::Context;
use crate::store::{Store, StoreError};

/// Applies the inventory file at `path`. At a start (`unless_applied`), a file applied
/// before exactly as it is now is left alone, so that what the API changed since stands.
/// Returns the changes, `None` when left alone so.
pub async fn apply_file(
    store: &Store,
    path: &Path,
    unless_applied: bool,
) -> anyhow::Result<Option<Vec<Change>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read inventory {}", path.display()))?;
    let inventory = Inventory::parse(&text, path)?;
    let digest = hex(&Sha256::digest(text.as_bytes()));
    let changes = store
        .apply_inventory_file(&inventory, &digest, unless_applied)
        .await
        .context("Failed to apply the inventory")?;
    match &changes {
        None => tracing::info!(
            inventory = %path.display(),
            "inventory file unchanged since it was last applied: the database's inventory stands"
        ),
        Some(changes) => log_changes(changes),
    }
    Ok(changes)
}

/// `SIGHUP`: the inventory file is read again and applied; a file with a mistake changes
/// nothing and is reported.
pub async fn reload(ctx: &Context) {
    tracing::info!(inventory = %ctx.config.inventory.display(), "SIGHUP: reloading the inventory");
    match apply_file(&ctx.store, &ctx.config.inventory, false).await {
        Ok(changes) => after(ctx, changes.as_deref().unwrap_or_default()),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "inventory not reloaded: nothing changed"
        ),
    }
}

/// Applies an edit of the inventory (see [`Store::apply_inventory`]) and sets the loops
/// to work on what changed.
pub async fn edit<F>(ctx: &Context, edit: F, dry_run: bool) -> Result<Vec<Change>, StoreError>
where
    F: FnOnce(&Inventory) -> Result<Inventory, EditError>,
{
    let changes = ctx.store.apply_inventory(edit, dry_run).await?;
    if !dry_run {
        log_changes(&changes);
        after(ctx, &changes);
    }
    Ok(changes)
}

fn log_changes(changes: &[Change]) {
    for change in changes {
        tracing::info!("inventory: {change}");
    }
}

/// New workers are probed now; rentals and instances on retired ones move now.
fn after(ctx: &Context, changes: &[Change]) {
    if changes.is_empty() {
        return;
    }
    ctx.wake.health.notify_one();
    ctx.wake.migration.notify_one();
    ctx.wake.apps.notify_one();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
