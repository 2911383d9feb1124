//! Prometheus metrics: counters and histograms recorded where things happen, fleet and
//! rental gauges computed from the database at scrape time, served on `GET /metrics`
//! (admin token).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Names of the metrics, in one place so the code and the docs agree.
pub mod names {
    /// Histogram: one successful probe (connect, authenticate, `true`), seconds.
    pub const PROBE_DURATION: &str = "orion_probe_duration_seconds";
    /// Counter: failed probe attempts.
    pub const PROBE_FAILURES: &str = "orion_probe_failures_total";
    /// Counter: rent requests by `outcome` (created, no_free_worker, failed).
    pub const RENTS: &str = "orion_rents_total";
    /// Histogram: rent request to answer, seconds.
    pub const RENT_DURATION: &str = "orion_rent_duration_seconds";
    /// Counter: moves by `outcome` (moved, failed).
    pub const MIGRATIONS: &str = "orion_migrations_total";
    /// Histogram: one move, from claim to active, seconds.
    pub const MIGRATION_DURATION: &str = "orion_migration_duration_seconds";
    /// Gauge: Unix time of each loop's last successful pass, by `loop`.
    pub const LOOP_LAST_SUCCESS: &str = "orion_loop_last_success_timestamp_seconds";
    /// Counter: requests refused with 429 by the per-address limit on requests without
    /// a valid token.
    pub const RATE_LIMITED: &str = "orion_http_rate_limited_total";
    /// Gauge: workers by `status` (alive, dead, unknown, quarantined, free, allocated).
    pub const WORKERS: &str = "orion_workers";
    /// Gauge: rentals by `status`.
    pub const RENTALS: &str = "orion_rentals";
    /// Gauge: the replicas each app asks for, by `tenant` and `app`.
    pub const APP_REPLICAS: &str = "orion_app_replicas";
    /// Gauge: each app's instances by `tenant`, `app` and `status` (pending, running,
    /// exited, crashloop, stopping).
    pub const APP_INSTANCES: &str = "orion_app_instances";
    /// Counter: containers the apps loop started, by `outcome` (created, restarted,
    /// failed), and removed (`outcome` removed).
    pub const INSTANCE_ACTIONS: &str = "orion_instance_actions_total";
    /// Counter: connections to the SSH gateway, by `outcome` (forwarded, refused: no
    /// live rental reachable, silent: nothing sent before `gateway.first_bytes_timeout`,
    /// busy: the gateway full, source_limit: `gateway.max_per_source`, wait_limit:
    /// `gateway.max_waiting` or `max_waiting_per_port`).
    pub const GATEWAY_CONNECTIONS: &str = "orion_gateway_connections_total";
    /// Counter: reads of the ports' rentals from the database by the SSH gateway (one
    /// read covers every port; connections are served from memory in between).
    pub const GATEWAY_LOOKUPS: &str = "orion_gateway_lookups_total";
    /// Counter: bytes the SSH gateway forwarded, both ways.
    pub const GATEWAY_BYTES: &str = "orion_gateway_bytes_total";
    /// Counter: bytes of home snapshots stored (compressed).
    pub const SNAPSHOT_BYTES: &str = "orion_snapshot_bytes_total";
    /// Counter: snapshots restored onto a rental's new worker, by `outcome` (restored,
    /// incomplete, none).
    pub const RESTORES: &str = "orion_restores_total";
}

/// Buckets for the latency histograms: from 5 ms (a probe on loopback) to 30 s (an
/// Ansible run on a slow worker).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program); then these
        // metrics simply stay empty.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
