//! The JSON the API reads and shows: request bodies (which the CLI sends too), and what
//! it shows of the store's records, the shapes clients read (the CLI, the dashboard's
//! script, a tenant's `notify_url`). The store returns rows; the shapes are decided
//! here, so a column can change without a client noticing. Each derives `ToSchema`, for
//! the OpenAPI document ([`super::ApiDoc`]), and those the CLI reads derive `Deserialize`
//! too: it reads the answers as these very types.

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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    #[schema(example = json!(["publickey"]))]
    pub auth: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the rental is released by itself, unless renewed (`null`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Every worker it has lived on, oldest first.
    pub placements: Vec<PlacementView>,
    /// Its stable SSH address on the gateway, for its whole life, whichever worker serves
    /// it (`null`: no gateway). Log in with `ssh -p <port> <username>@<host>`.
    pub endpoint: Option<EndpointView>,
    /// When its home was last snapshotted (what a failover restores), and the
    /// snapshot's size, compressed.
    pub last_snapshot_at: Option<DateTime<Utc>>,
    pub snapshot_bytes: Option<u64>,
}

/// A rental's address on the SSH gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndpointView {
    pub host: String,
    pub port: u16,
}

impl EndpointView {
    /// The `ssh` command that logs `username` in through this endpoint.
    pub fn ssh_command(&self, username: &str) -> String {
        format!("ssh -p {} {username}@{}", self.port, self.host)
    }
}

/// One stay of a rental on a worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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

impl RentalView {
    /// The view of `detail`; `gateway_host` is the host name of its endpoint.
    pub fn new(detail: RentalDetail, gateway_host: &str) -> Self {
        let RentalDetail {
            rental: r,
            worker,
            placements,
            snapshot,
        } = detail;
        let mut auth = Vec::new();
        if r.public_key.is_some() {
            auth.push("publickey".to_owned());
        }
        if r.password_hash.is_some() {
            auth.push("password".to_owned());
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
            endpoint: r.endpoint_port.map(|port| EndpointView {
                host: gateway_host.to_owned(),
                port,
            }),
            last_snapshot_at: snapshot.as_ref().map(|s| s.taken_at),
            snapshot_bytes: snapshot.as_ref().map(|s| s.bytes),
        }
    }
}

/// The answer to `POST /api/rent`: the rental, and the generated password when no key
/// was given (shown once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RentedView {
    #[serde(flatten)]
    pub rental: RentalView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// A worker as `POST /api/workers/{name}/drain` shows it: the stored fields and whether
/// a rental holds it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RentalList {
    pub rentals: Vec<RentalView>,
}

/// `GET /api/workers`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<FleetWorkerView>,
}

/// `GET /api/tokens`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenRecord>,
}

/// `GET /api/events`: a page of events, and the `after` of the next page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next: u64,
}

/// Every error answer: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_input`, `not_found`, `no_free_worker`, …
    pub code: String,
    pub message: String,
    /// The request field at fault, for `invalid_input`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
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
    /// This process's name among the replicas (`leader.instance`).
    pub instance: String,
    /// Whether this process runs the control loops (holds the lease).
    pub leader: bool,
    /// The lease's epoch this process leads with (`null` while it does not lead): the
    /// fencing token every write of its loops carries.
    pub epoch: Option<u64>,
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
    /// This process's name among the replicas, and whether it runs the loops: the
    /// `loops` below are this process's own (a follower's have not run).
    pub instance: String,
    pub leader: bool,
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
    /// Only on a worker of this site. A move later prefers the site the rental lives
    /// in, and leaves it (with an event) only when the site has no usable worker left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Only on workers carrying all of these labels, now and at every move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// On a worker of this site if one is free, else anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefer_site: Option<String>,
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::*;
    use crate::model::WorkerStatus;

    /// What the API writes, the client reads back whole: re-serialised, the same JSON.
    fn reads_back<T: Serialize + DeserializeOwned>(answer: &T) -> Value {
        let json = serde_json::to_value(answer).unwrap();
        let read: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), json);
        json
    }

    fn worker() -> Worker {
        Worker {
            id: 3,
            name: "worker_1".into(),
            site: "a".into(),
            labels: Default::default(),
            ssh_host: "10.0.0.1".into(),
            ssh_port: 22,
            public_host: "127.0.0.1".into(),
            public_port: 2201,
            app_host: None,
            instances_join: None,
            pinned_host_key: None,
            known_host_key: Some("ssh-ed25519 AAAA".into()),
            host_cert_key: None,
            host_cert_expires: None,
            status: WorkerStatus::Alive,
            consecutive_failures: 0,
            consecutive_successes: 4,
            quarantine_reason: None,
            quarantined_at: None,
            retired: false,
            drained: true,
            rental_id: Some("r-1".into()),
            last_checked: Some(Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap()),
            last_seen_alive: None,
            probe_latency_ms: Some(12),
            last_probe_error: None,
        }
    }

    #[test]
    fn the_answers_the_client_reads_read_back_whole() {
        let at = Utc.with_ymd_and_hms(2025, 3, 1, 12, 30, 5).unwrap()
            + chrono::Duration::microseconds(123_456);
        let rental = RentalView {
            id: "r-1".into(),
            tenant: "admin".into(),
            username: "vic".into(),
            status: RentalStatus::Active,
            worker: Some("worker_1".into()),
            site: Some("a".into()),
            host: Some("127.0.0.1".into()),
            port: Some(2201),
            auth: vec!["password".into()],
            created_at: at,
            updated_at: at,
            ended_at: None,
            expires_at: None,
            placements: vec![PlacementView {
                worker: "worker_1".into(),
                state: PlacementState::Active,
                started_at: at,
                ended_at: None,
            }],
            endpoint: Some(EndpointView {
                host: "localhost".into(),
                port: 2200,
            }),
            last_snapshot_at: Some(at),
            snapshot_bytes: Some(4096),
        };
        let rented = reads_back(&RentedView {
            rental: rental.clone(),
            password: Some("secret".into()),
        });
        assert_eq!(rented["password"], "secret");
        assert_eq!(rented["created_at"], "2025-03-01T12:30:05.123456Z");
        reads_back(&RentalList {
            rentals: vec![rental],
        });

        let fleet = reads_back(&WorkerList {
            workers: vec![FleetWorkerView {
                worker: WorkerView::from(worker()),
                rental: Some(Occupant {
                    rental_id: "r-1".into(),
                    tenant: "admin".into(),
                    username: "vic".into(),
                    serving: true,
                }),
            }],
        });
        let shown = &fleet["workers"][0];
        assert_eq!(
            (&shown["allocated"], &shown["rental"]["id"]),
            (&true.into(), &"r-1".into())
        );
        assert!(shown.get("ssh_host").is_none(), "{shown}");
        reads_back(&WorkerView::from(worker()));

        reads_back(&EventPage {
            events: vec![Event {
                id: 1,
                at,
                kind: "worker.drained".into(),
                worker: Some("worker_1".into()),
                rental_id: None,
                message: "drained".into(),
            }],
            next: 1,
        });
        let error = reads_back(&ErrorBody {
            error: ErrorDetail {
                code: "invalid_input".into(),
                message: "username: is reserved".into(),
                field: Some("username".into()),
            },
        });
        assert_eq!(error["error"]["field"], "username");
    }
}
