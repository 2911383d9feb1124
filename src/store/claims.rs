//! A rental claiming a worker: the placement constraints a rent asks for, and the claim
//! of one usable, free worker inside the rent's transaction, safe against concurrent
//! claims.

use sqlx::{MySql, Transaction};

use super::Worker;
use super::workers::WORKER_COLUMNS;
use crate::inventory::Labels;

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

/// How many workers a claim tries in order of preference before taking any free one.
const PREFERRED_TRIES: usize = 4;

/// Claims one usable, free worker for `rental_id` inside `tx`. Rows another
/// transaction is claiming are skipped rather than waited for, so concurrent claims
/// neither block nor deadlock, and never get the same worker. The order is the primary
/// key's, which InnoDB reads without sorting: with a sort it would lock every candidate
/// row before returning the first, and concurrent claims would skip them all.
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
