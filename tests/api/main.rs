//! Integration tests against real MariaDB and real sshd worker containers.
//! Run them with `scripts/test.sh`, which starts what they need.

mod ansible;
mod apps;
mod auth;
mod cli;
mod continuity;
mod crash;
mod dashboard;
mod events;
mod failover;
mod fuzz;
mod guard;
mod helpers;
mod hostile_apps;
mod hostile_bodies;
mod hostile_gateway;
mod hostile_ipc;
mod hostile_snapshots;
mod hostile_tenants;
mod idempotency;
mod isolation;
mod leader;
mod openapi;
mod outage;
mod playbooks;
mod probe;
mod rent;
mod routing;
mod sites;
mod startup;
mod worker_hardening;
mod worker_rules;
