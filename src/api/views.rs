//! What the API shows of the store's records: the JSON shapes clients read (the CLI, the
//! dashboard's script, a tenant's `notify_url`). The store returns rows; the shapes are
//! decided here, so a column can change without a client noticing.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{PlacementState, RentalStatus};
use crate::store::{PlacementRecord, RentalDetail};

/// A rental as a client sees it: where it lives now and where it has lived.
#[derive(Debug, Clone, Serialize)]
pub struct RentalView {
    pub id: String,
    pub tenant: String,
    pub username: String,
    pub status: RentalStatus,
    /// The worker serving it now, and how to reach it (`null` while waiting, once over).
    pub worker: Option<String>,
    pub site: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// How the tenant logs in: `publickey`, `password`, or both.
    pub auth: Vec<&'static str>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the rental is released by itself, unless renewed (`null`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Every worker it has lived on, oldest first.
    pub placements: Vec<PlacementView>,
}

/// One stay of a rental on a worker.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementView {
    pub worker: String,
    pub state: PlacementState,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl From<PlacementRecord> for PlacementView {
    fn from(p: PlacementRecord) -> Self {
        Self {
            worker: p.worker,
            state: p.state,
            started_at: p.started_at,
            ended_at: p.ended_at,
        }
    }
}

impl From<RentalDetail> for RentalView {
    fn from(detail: RentalDetail) -> Self {
        let RentalDetail {
            rental: r,
            worker,
            placements,
        } = detail;
        let mut auth = Vec::new();
        if r.public_key.is_some() {
            auth.push("publickey");
        }
        if r.password_hash.is_some() {
            auth.push("password");
        }
        Self {
            id: r.id,
            tenant: r.tenant,
            username: r.username,
            status: r.status,
            worker: worker.as_ref().map(|w| w.name.clone()),
            site: worker.as_ref().map(|w| w.site.clone()),
            host: worker.as_ref().map(|w| w.public_host.clone()),
            port: worker.as_ref().map(|w| w.public_port),
            auth,
            created_at: r.created_at,
            updated_at: r.updated_at,
            ended_at: r.ended_at,
            expires_at: r.expires_at,
            placements: placements.into_iter().map(PlacementView::from).collect(),
        }
    }
}
