//! The `orion` command's client side, run as a real process against a running Orion.

use std::process::{Command, Output};

use crate::helpers::{ADMIN_TOKEN, TestApp, spawn_app, tenant_key};

fn orion(app: &TestApp, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orion"));
    cmd.args(args)
        .env("ORION_URL", &app.address)
        .env_remove("ORION_TOKEN");
    if let Some(t) = token {
        cmd.env("ORION_TOKEN", t);
    }
    cmd.output().expect("cannot run the orion binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// Multi-threaded: the test blocks on the CLI process while the in-process Orion answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rents_lists_drains_and_releases_with_reliable_exit_codes() {
    let app = spawn_app(2).await;
    let (_, public) = tenant_key();
    let key_file = app.dir.path().join("tenant.pub");
    std::fs::write(&key_file, format!("{public}\n")).unwrap();
    let admin = Some(ADMIN_TOKEN);

    let out = orion(&app, admin, &["workers", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let workers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(workers["workers"].as_array().unwrap().len(), 2);
    let out = orion(&app, admin, &["workers"]);
    assert!(stdout(&out).starts_with("NAME"), "{}", stdout(&out));

    let out = orion(
        &app,
        admin,
        &[
            "rent",
            "--key",
            key_file.to_str().unwrap(),
            "--username",
            "vic",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    // The command to log in goes through the rental's endpoint on the gateway.
    assert!(
        text.contains("ssh -p ") && text.contains(" vic@localhost"),
        "{text}"
    );
    assert!(text.contains("orion known-hosts"), "{text}");
    let id = text.split_whitespace().nth(1).unwrap().to_owned();

    let out = orion(&app, admin, &["rentals"]);
    assert!(stdout(&out).contains("vic"), "{}", stdout(&out));
    let out = orion(&app, admin, &["known-hosts"]);
    assert!(
        stdout(&out).starts_with("@cert-authority localhost,[localhost]:* ssh-ed25519 "),
        "{out:?}"
    );
    let out = orion(&app, admin, &["drain", "worker_2"]);
    assert!(stdout(&out).contains("worker_2: drained"), "{out:?}");
    // A quarantined worker shows why and since when, and one command restores it.
    let row = app.worker_row("worker_2").await;
    app.ctx
        .store
        .quarantine(&row, "a test's reason")
        .await
        .unwrap();
    let out = orion(&app, admin, &["workers"]);
    assert!(
        stdout(&out).contains("a test's reason") && stdout(&out).contains("QUARANTINED_AT"),
        "{}",
        stdout(&out)
    );
    let out = orion(&app, admin, &["restore", "worker_2"]);
    assert!(
        stdout(&out).contains("worker_2: back in service"),
        "{out:?}"
    );
    assert_eq!(app.worker_row("worker_2").await.quarantine_reason, None);
    let out = orion(&app, admin, &["restore", "worker_9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = orion(&app, admin, &["events", "--last", "5"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).lines().count(), 5, "{}", stdout(&out));

    // Exit codes: 1 refused, 2 usage, 3 unavailable.
    let out = orion(&app, admin, &["release", "no-such-rental"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such rental"));
    assert_eq!(
        orion(&app, None, &["rentals"]).status.code(),
        Some(1),
        "no token: 401"
    );
    assert_eq!(
        orion(&app, admin, &["rent", "--key", "/nonexistent.pub"])
            .status
            .code(),
        Some(2)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_orion"))
        .args([
            "rentals",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            ADMIN_TOKEN,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "unreachable");

    let out = orion(&app, admin, &["release", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(!app.worker("worker_1").has_user("vic") && !app.worker("worker_2").has_user("vic"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orion_check_probes_every_worker_and_fails_when_one_does_not_answer() {
    let app = spawn_app(2).await;
    let config = app.dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "inventory = \"{dir}/inventory.toml\"\nplaybooks = \"{repo}/playbooks\"\n\
             [database]\nurl = \"mysql://unused@127.0.0.1:1/none\"\n\
             [ssh]\nkey = \"{key}\"\nconnect_timeout = \"2s\"\n\
             [auth]\nadmin_token = \"{ADMIN_TOKEN}\"\n[health]\nprobe_timeout = \"2s\"\n",
            dir = app.dir.path().display(),
            key = app.key.path.display(),
            repo = env!("CARGO_MANIFEST_DIR"),
        ),
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_orion"))
            .args(["--config", config.to_str().unwrap(), "check"])
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("WORKER"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" ok ")).count(),
        2,
        "{text}"
    );

    app.worker("worker_1").stop();
    let out = check();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).contains("FAILED"), "{}", stdout(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 2 workers failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_new_events_as_they_happen() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let app = spawn_app(2).await;
    // One event at least, for the backlog line.
    let out = orion(&app, Some(ADMIN_TOKEN), &["drain", "worker_1"]);
    assert!(out.status.success(), "{out:?}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_orion"))
        .args(["events", "--last", "1", "--follow"])
        .env("ORION_URL", &app.address)
        .env("ORION_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The latest event first, then the live ones.
    let first = tokio::task::spawn_blocking(move || {
        let first = lines.next().unwrap().unwrap();
        (first, lines)
    })
    .await
    .unwrap();
    let (_, mut lines) = first;
    // The stream is opened right after the backlog is printed.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let out = orion(&app, Some(ADMIN_TOKEN), &["drain", "worker_2"]);
    assert!(out.status.success(), "{out:?}");
    let live = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            lines
                .by_ref()
                .map_while(Result::ok)
                .find(|l| l.contains("worker_2"))
        }),
    )
    .await
    .expect("no live event within 10 s")
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let live = live.expect("the stream ended");
    assert!(live.contains("worker.drained"), "{live}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_shows_scales_and_deletes_an_app() {
    let app = spawn_app(2).await;
    let admin = Some(ADMIN_TOKEN);
    let out = orion(
        &app,
        admin,
        &[
            "app",
            "create",
            "cli",
            "--image",
            "orion/demo-app",
            "--port",
            "8080",
            "--env",
            "GREETING=a b=c",
            "--",
            "python3",
            "/srv/server.py",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("cli: 1 × orion/demo-app"),
        "{}",
        stdout(&out)
    );
    // Ready: the table shows it running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = orion(&app, admin, &["app", "show", "cli", "--json"]);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if view["ready"] == 1 {
            assert_eq!(
                view["command"],
                serde_json::json!(["python3", "/srv/server.py"])
            );
            assert_eq!(view["env"], serde_json::json!(["GREETING"]));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {view}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = orion(&app, admin, &["app", "show", "cli"]);
    let text = stdout(&out);
    assert!(text.contains("1 ready, port 8080"), "{text}");
    assert!(text.lines().nth(1).unwrap().starts_with("ID"), "{text}");
    assert!(text.contains("running"), "{text}");
    let out = orion(&app, admin, &["apps"]);
    assert!(stdout(&out).starts_with("NAME"), "{}", stdout(&out));
    assert!(stdout(&out).contains("cli"), "{}", stdout(&out));
    let out = orion(&app, admin, &["app", "logs", "cli", "--lines", "5"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("listening"), "{}", stdout(&out));

    let out = orion(&app, admin, &["app", "scale", "cli", "2"]);
    assert!(stdout(&out).contains("cli: 2 ×"), "{out:?}");
    // Refusals exit 1 with the API's message; bad local input exits 2.
    let out = orion(&app, admin, &["app", "scale", "nope", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such app"),
        "{out:?}"
    );
    let out = orion(
        &app,
        admin,
        &["app", "create", "x", "--image", "i", "--env", "NOEQUALS"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = orion(&app, admin, &["app", "delete", "cli"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("deleted cli"), "{}", stdout(&out));
    let out = orion(&app, admin, &["app", "show", "cli"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Gone from the workers too (no container outlives the test).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.count("SELECT COUNT(*) FROM apps").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted app's instances stayed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `orion inventory export` then `apply`: the difference is shown first, `--dry-run`
/// changes nothing, a file with a mistake is refused (exit 1, the line named), and the
/// apply retires the worker left out; `orion rent --site` asks for a site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exports_and_applies_the_inventory_with_the_difference_first() {
    let app = spawn_app(2).await;
    let admin = Some(ADMIN_TOKEN);
    let out = orion(&app, admin, &["inventory", "export"]);
    assert!(out.status.success(), "{out:?}");
    let exported = stdout(&out);
    let inventory =
        orion::inventory::Inventory::parse(&exported, std::path::Path::new("exported")).unwrap();
    assert_eq!(inventory.workers.len(), 2);

    let file = app.dir.path().join("one.toml");
    std::fs::write(&file, inventory.without("worker_2").unwrap().to_toml()).unwrap();
    let file = file.to_str().unwrap();
    let out = orion(&app, admin, &["inventory", "apply", "--dry-run", file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "- worker_2: retired\n1 change(s) (dry run: nothing applied)\n"
    );
    assert!(!app.worker_row("worker_2").await.retired);

    let bad = app.dir.path().join("bad.toml");
    std::fs::write(&bad, "[[workers]]\nname = \"w\"\nhost = \"h\"\nport = 0\n").unwrap();
    let out = orion(&app, admin, &["inventory", "apply", bad.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a local file's mistake: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:4: workers[0].port"),
        "{out:?}"
    );

    let out = orion(&app, admin, &["inventory", "apply", file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "- worker_2: retired\n1 change(s) applied\n");
    assert!(app.worker_row("worker_2").await.retired);
    let out = orion(&app, admin, &["inventory", "apply", file]);
    assert_eq!(
        stdout(&out),
        "no change: the inventory is already this file's\n"
    );

    let out = orion(&app, admin, &["rent", "--site", "nowhere"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown site `nowhere`"),
        "{out:?}"
    );
    let out = orion(&app, admin, &["rent", "--site", "test", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let rented: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rented["worker"], "worker_1");
}
