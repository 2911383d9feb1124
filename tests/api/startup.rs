use orion::startup::Application;

use crate::helpers::{create_database, test_config, write_private_key};

#[tokio::test]
async fn a_bad_inventory_stops_orion_naming_the_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    write_private_key(&orion::ssh::generate_ed25519(), &key);
    let inventory = dir.path().join("bad.toml");
    std::fs::write(
        &inventory,
        "[[workers]]\nname = \"w1\"\nhost = \"127.0.0.1\"\nport = 0\n",
    )
    .unwrap();
    let database = create_database().await;
    let config = test_config(&database, &inventory, &key);
    let err = Application::build(config)
        .await
        .err()
        .expect("a bad inventory is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("{}:4: workers[0].port", inventory.display())),
        "{msg}"
    );
    // Nothing was written: the schema was not even applied.
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()",
    )
    .fetch_one(
        &mut <sqlx::MySqlConnection as sqlx::Connection>::connect(&database)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(tables, 0);
}

#[tokio::test]
async fn a_world_readable_key_stops_orion() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    write_private_key(&orion::ssh::generate_ed25519(), &key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        "[[workers]]\nname = \"w1\"\nhost = \"127.0.0.1\"\nport = 2\n",
    )
    .unwrap();
    let config = test_config("mysql://unused@127.0.0.1:1/none", &inventory, &key);
    let err = Application::build(config)
        .await
        .err()
        .expect("a readable key is refused");
    assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
}

#[tokio::test]
async fn the_inventory_is_synced_and_removed_workers_are_retired() {
    let app = crate::helpers::spawn_app(2).await;
    let inventory = app.dir.path().join("inventory.toml");
    // Drop worker_2 from the inventory and sync again.
    let only_first = crate::helpers::inventory_for(&app.workers[..1]);
    std::fs::write(&inventory, &only_first).unwrap();
    let changes = orion::inventory::apply_file(&app.ctx.store, &inventory, false)
        .await
        .unwrap()
        .expect("applied");
    assert_eq!(changes.len(), 1, "{changes:?}");
    let w2 = app.worker_row("worker_2").await;
    assert!(w2.retired);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers").await,
        2,
        "retired, not deleted"
    );
    let summary = orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    assert_eq!(summary.probed, 1, "retired workers are not probed");
}

/// Replicas starting together on a fresh database: the schema is applied once, by one of
/// them, under the lock row (which holds across Galera nodes, as `GET_LOCK` would not),
/// and every one of them then finds it whole. A lock whose holder died is taken over once
/// it expires; one that is held makes the others wait.
#[tokio::test]
async fn replicas_migrating_at_once_apply_the_schema_once_under_the_lock_row() {
    use std::time::Duration;

    use orion::store::Store;

    let database = create_database().await;
    let stores: Vec<Store> = (0..4)
        .map(|_| Store::connect_lazy(&database, 4, Duration::from_secs(10)).unwrap())
        .collect();
    let results = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let pool = stores[0].pool();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, files, "every migration recorded once");
    let (holder, expires): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT holder, CAST(expires_at AS CHAR) FROM orion_schema_lock")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((holder, expires), (None, None), "the lock is let go");

    // A process died holding the lock, which expired: the next start takes it over.
    sqlx::query(
        "UPDATE orion_schema_lock SET holder = 'dead', \
         expires_at = NOW(3) - INTERVAL 1 SECOND",
    )
    .execute(pool)
    .await
    .unwrap();
    stores[1].migrate().await.unwrap();
    // One holds it now: another start waits rather than migrating beside it.
    sqlx::query(
        "UPDATE orion_schema_lock SET holder = 'alive', \
         expires_at = NOW(3) + INTERVAL 2 SECOND",
    )
    .execute(pool)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    stores[2].migrate().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "waited for the holder's lock to expire ({:?})",
        started.elapsed()
    );
}
