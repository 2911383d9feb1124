//! Orion: an SSH-driven, agentless orchestrator for a static inventory of workers.
//!
//! A client rents a worker through the HTTP API; Orion picks a healthy free worker,
//! provisions the tenant's account on it over SSH with a templated playbook, and hands back
//! connection details. A scheduler probes every worker over SSH; when a rented worker
//! dies, it moves the rental to a healthy worker with the same credentials.
//!
//! # Layout, by layer
//!
//! Each layer should use only the layers below it. Not all do yet: some domain and
//! store modules still take the whole [`context::Context`], and applying the inventory
//! live reaches into the store and the loops' wakers from below them.
//!
//! **Entry points** (what a process starts with)
//! - [`startup`]: builds the application from a config and runs it until shutdown.
//! - [`client`]: the client side of the `orion` command (`rent`, `workers`, `events -f`…):
//!   its clap definition, the HTTP client, the tables it prints.
//! - [`check`]: `orion check`: validates the configuration, inventory, playbooks and key,
//!   and probes every worker.
//! - `testkit` (cargo feature `testkit`, on for tests and `orion-bench`): the harness of
//!   the integration tests and benchmarks (Docker workers, per-test databases); not in
//!   the shipped binary.
//!
//! **The edge** (HTTP and SSH as clients see them)
//! - [`api`]: the axum router, one file per resource, the single error-to-response
//!   mapping, the guard every request passes (JSON bodies only, Basic credentials only to
//!   read, the client address, bodies read to their end), the OpenAPI document and the
//!   live dashboard (`/dashboard`, its page, script and style in `web/`).
//! - [`gateway`]: the SSH gateway: one stable port per rental, forwarded byte for byte
//!   to the worker serving it now.
//! - [`ratelimit`]: the per-address budget of requests without a valid token, and the
//!   bounds on tenants' log reads.
//! - [`proxies`]: which peers may speak for a client's address.
//! - [`auth`]: tokens (Bearer, or a Basic password from browsers): the admin's from the
//!   configuration, tenants' from the DB.
//!
//! **The control loops**
//! - [`loops`]: the control loops, one file each, and the driver that runs them (interval,
//!   wake-ups, capped back-off, last success and last error):
//!   - [`loops::health`]: probe every worker each round, record what hysteresis concludes;
//!   - [`loops::watch`]: one idle SSH session per worker, so a worker that goes away is
//!     re-probed within milliseconds;
//!   - [`loops::migration`]: move rentals off dead workers, same credentials;
//!   - [`loops::cleanup`]: remove leftover tenant accounts from workers before they are
//!     offered again, and keep each worker's host certificate current;
//!   - [`loops::snapshots`]: snapshot each active rental's home when it changed;
//!   - [`loops::apps`]: make the workers hold exactly the apps' instances (observe with
//!     one SSH command per worker, remove, start), woken by the workers' own container
//!     events.
//! - [`leader`]: which of several `orion` processes runs the loops: a lease in the
//!   database with a fencing epoch that every loop write checks.
//! - [`context`]: the handles shared by the API and the loops, including the tracker of
//!   detached tasks that shutdown waits for.
//!
//! **The domain** (what Orion does, apart from how it is asked)
//! - [`rentals`]: the rent and release operations and their rules (TTL, quota, replay),
//!   shared by the API and the loops.
//! - [`apps`]: container workloads on the workers: validation of what tenants ask, the
//!   pure scheduling and reconciling decisions, Caddy's routes, and the protocol of
//!   `orion-runtime`, the wrapper each worker carries.
//! - [`probe`]: probing: one worker's probe (confirmation, hysteresis, recording), shared
//!   by the health and watch loops; how deep each probe goes and the memory of what each
//!   worker proved ([`probe::depth`]); the pure rules ([`probe::policy`]); the guard on
//!   moves when Orion looks cut off, with its holds ([`probe::guard`]).
//! - [`snapshots`]: taking a home's snapshot (streamed over SSH into the database) and
//!   restoring it on a rental's new worker.
//! - [`hostca`]: Orion's SSH host certificate authority: signs and installs each worker's
//!   host certificate, and gives tenants the one `known_hosts` line they need.
//! - [`notify`]: delivering `notify_url` notifications to public addresses only.
//! - [`inventory`]: the workers Orion may rent out: the file (`inventory/*.toml`) parsed
//!   and validated with errors that name the file, line and field, the admin API's edits,
//!   the diff, and applying it live (at start, on `SIGHUP`, through the API).
//!
//! **Talking to the outside world**
//! - [`store`]: MariaDB through sqlx: schema migrations, workers (and the rules on them,
//!   each a predicate beside its SQL), rentals, placements, apps and the append-only
//!   events log.
//! - [`playbook`]: playbook templates (minijinja, every value shell-quoted by the
//!   formatter) and the two executors that run them on a worker (native, Ansible).
//! - [`ssh`]: the russh client: Orion's key, host-key verification, timeouts, sessions,
//!   streams and watches; it executes, and decides nothing.
//!
//! **The ground** (used by every layer)
//! - [`config`]: the one configuration struct, read from TOML with `ORION_*` overrides,
//!   typed when read.
//! - [`model`]: the words of the domain (worker status, rental status, usernames, keys,
//!   passwords) and the validation of what clients send.
//! - [`clock`]: the time the API's limits read, which tests may stop and move.
//! - [`metrics`]: Prometheus metrics, served on `/metrics`.
//! - [`telemetry`]: logging setup.
//! - [`progress`]: progress bars for long work run from a terminal.

pub mod api;
pub mod apps;
pub mod auth;
pub mod check;
pub mod client;
pub mod clock;
pub mod config;
pub mod context;
pub mod gateway;
pub mod hostca;
pub mod inventory;
pub mod leader;
pub mod loops;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod playbook;
pub mod probe;
pub mod progress;
pub mod proxies;
pub mod ratelimit;
pub mod rentals;
pub mod snapshots;
pub mod ssh;
pub mod startup;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
