//! The worker rules (`orion::store::Worker`): each predicate and its SQL fragment say the
//! same thing, on every combination of status, quarantine, retired and drained.

use std::collections::BTreeSet;
use std::time::Duration;

use orion::model::WorkerStatus;
use orion::store::{Store, Worker};

use crate::helpers::create_database;

/// Each rule: its name, its SQL fragment, its predicate, and on how many of the 24
/// combinations it holds (3 statuses × quarantined × retired × drained).
type Rule = (&'static str, &'static str, fn(&Worker) -> bool, usize);

const RULES: &[Rule] = &[
    // Alive, not quarantined: 1 × 1 × 2 × 2.
    ("answers", Worker::ANSWERS_SQL, Worker::answers, 4),
    // That, and not retired: 1 × 1 × 1 × 2.
    ("is_tended", Worker::TENDED_SQL, Worker::is_tended, 2),
    // That, and not drained.
    ("is_usable", Worker::USABLE_SQL, Worker::is_usable, 1),
    // Quarantined or retired (3 of the 4 pairs) whatever the status and drained.
    (
        "is_withdrawn",
        Worker::WITHDRAWN_SQL,
        Worker::is_withdrawn,
        18,
    ),
    // Dead (8), or withdrawn while unknown or alive (12).
    ("is_lost", Worker::LOST_SQL, Worker::is_lost, 20),
];

#[tokio::test]
async fn each_worker_rule_holds_on_the_same_workers_in_rust_and_in_sql() {
    let store = Store::connect_lazy(&create_database().await, 2, Duration::from_secs(10)).unwrap();
    store.migrate().await.unwrap();
    let pool = store.pool();
    for status in ["unknown", "alive", "dead"] {
        for quarantined in [false, true] {
            for retired in [false, true] {
                for drained in [false, true] {
                    let name = format!("{status}_q{quarantined}_r{retired}_d{drained}");
                    sqlx::query(
                        "INSERT INTO workers (name, site, ssh_host, ssh_port, public_host, \
                         public_port, status, quarantine_reason, retired, drained, \
                         created_at, updated_at) \
                         VALUES (?, 'default', 'h', 22, 'h', 22, ?, ?, ?, ?, \
                         UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    )
                    .bind(&name)
                    .bind(status)
                    .bind(quarantined.then_some("host key changed"))
                    .bind(retired)
                    .bind(drained)
                    .execute(pool)
                    .await
                    .unwrap();
                }
            }
        }
    }
    let workers = store.list_workers().await.unwrap();
    assert_eq!(workers.len(), 24);

    for (rule, sql, holds, expected) in RULES {
        let in_sql: BTreeSet<String> =
            sqlx::query_scalar(&format!("SELECT name FROM workers WHERE {sql}"))
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let in_rust: BTreeSet<String> = workers
            .iter()
            .filter(|w| holds(w))
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(
            in_sql, in_rust,
            "{rule}: the SQL fragment and the predicate differ"
        );
        assert_eq!(in_rust.len(), *expected, "{rule} holds on {in_rust:?}");
    }

    // A rental leaves every worker that is not usable, and the reason it gives is true.
    for w in &workers {
        assert_eq!(w.must_leave(), !w.is_usable(), "{}", w.name);
        if w.must_leave() {
            let true_of_it = match w.why_leaving() {
                "drained" => w.drained,
                "quarantined" => w.quarantine_reason.is_some(),
                "retired" => w.retired,
                "dead" => w.status != WorkerStatus::Alive,
                other => panic!("{}: unknown reason {other}", w.name),
            };
            assert!(true_of_it, "{} is not {}", w.name, w.why_leaving());
        }
    }
}
