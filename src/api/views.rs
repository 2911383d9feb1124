//! The JSON the API reads and shows: request bodies (which the CLI sends too), and what
//! it shows of the store's records, the shapes clients read (the CLI, the dashboard's
//! script, a tenant's `notify_url`). The store returns rows; the shapes are decided
//! here, so a column can change without a client noticing. Each derives `ToSchema`, for
//! the OpenAPI document ([`super::ApiDoc`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::loops::LoopState;
use crate::model::{PlacementState, RentalStatus, TtlInput};
use crate::store::{
    Event, Occupant, PlacementRecord, RentalDetail, TokenRecord, Worker, WorkerCounts,
};

/// A rental as a client sees it: where it lives now and where it has lived.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
    #[schema(value_type = Vec<String>, example = json!(["publickey"]))]
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
#[derive(Debug, Clone, Serialize, ToSchema)]
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

/// The answer to `POST /api/rent`: the rental, and the generated password when no key
/// was given (shown once).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RentedView {
    #[serde(flatten)]
    pub rental: RentalView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// A worker as `POST /api/workers/{name}/drain` shows it: the stored fields and whether
/// a rental holds it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerView {
    #[serde(flatten)]
    pub worker: Worker,
    /// Held by a rental, serving it or awaiting cleanup of its account.
    pub allocated: bool,
}

impl From<Worker> for WorkerView {
    fn from(worker: Worker) -> Self {
        Self {
            allocated: worker.allocated(),
            worker,
        }
    }
}

/// A worker as `GET /api/workers` shows it: also the rental holding it (`null`: none).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FleetWorkerView {
    #[serde(flatten)]
    pub worker: WorkerView,
    pub rental: Option<Occupant>,
}

/// The answer to `POST /api/tokens`: the record, and the token itself (shown once).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub record: TokenRecord,
    pub token: String,
}

/// `GET /api/rentals`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RentalList {
    pub rentals: Vec<RentalView>,
}

/// `GET /api/workers`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<FleetWorkerView>,
}

/// `GET /api/tokens`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

/// `GET /api/events`: a page of events, and the `after` of the next page.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next: u64,
}

/// Every error answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_input`, `not_found`, `no_free_worker`, …
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, for `invalid_input`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
}

/// `GET /health`: 200 with `"status": "ok"` and `"database": "up"`, or 503 with
/// `"degraded"`, `"down"` and the error.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthView {
    /// `ok` or `degraded`.
    pub status: &'static str,
    /// `up` or `down`.
    pub database: &'static str,
    pub version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `GET /api/status`: as [`HealthView`], with the fleet counts (absent while the
/// database is down), each control loop's state and the requests rate limited.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StatusView {
    /// `ok` or `degraded`.
    pub status: &'static str,
    /// `up` or `down`.
    pub database: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Keyed by loop name.
    #[schema(value_type = BTreeMap<String, LoopState>)]
    pub loops: BTreeMap<&'static str, LoopState>,
    pub rate_limited: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Body of `POST /api/rent`. Every field is optional; unknown fields are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RentBody {
    /// One OpenSSH public key line; without it a password is generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<String>,
    /// Login name wanted on the worker; generated if absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Where to POST the new connection details when the rental moves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    /// How long the rental lives unless renewed: seconds, or e.g. `"2h"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<TtlInput>,
}

/// Body of `POST /api/rentals/{id}/renew`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// The rental's new time to live, from now: seconds, or e.g. `"2h"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<TtlInput>,
}

/// Body of `POST /api/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// Required: the tenant the token acts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// This token's limit on the tenant's live rentals (default: `tenants.max_rentals`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rentals: Option<u32>,
}
