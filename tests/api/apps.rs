//! Apps against real workers and the real container engine: instances run as siblings
//! of their worker, in its namespaces, reached at its address; the apps loop makes the
//! workers hold exactly what the apps ask for.

use std::time::{Duration, Instant};

use orion::ssh::Auth;
use orion::testkit::docker;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, spawn_app_with, tenant_key};

const IMAGE: &str = "orion/demo-app:latest";

/// Polls `GET /api/apps/{name}` until `pred` holds, or fails after `timeout`.
pub(crate) async fn wait_app(
    app: &TestApp,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, view) = app.get_json(&format!("/api/apps/{name}")).await;
        if status == 200 && pred(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "app {name} never reached the expected state: {status} {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn running(view: &Value) -> Vec<&Value> {
    view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "running")
        .collect()
}

/// Every container on the engine labelled with one of the test's workers' nodes, as
/// `(name, state)`.
pub(crate) fn containers(app: &TestApp) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for w in &app.workers {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=orion.node={}", w.container),
            "--format",
            "{{.Names}} {{.State}}",
        ]);
        for line in out.lines().filter(|l| !l.is_empty()) {
            let (name, state) = line.split_once(' ').unwrap();
            all.push((name.to_owned(), state.to_owned()));
        }
    }
    all.sort();
    all
}

/// Asks an instance over HTTP what it is: `{"app", "instance", "path"}`.
pub(crate) async fn ask(host: &str, port: u64) -> Result<Value, String> {
    let resp = reqwest::Client::new()
        .get(format!("http://{host}:{port}/hello"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    resp.json().await.map_err(|e| e.to_string())
}

/// Asks until the instance answers (a container runs a moment before its server
/// listens), or fails after 10 s.
pub(crate) async fn ask_until_up(host: &str, port: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ask(host, port).await {
            Ok(answer) => return answer,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{host}:{port} never answered: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn create(app: &TestApp, body: Value) -> (reqwest::StatusCode, Value) {
    let resp = app
        .http
        .post(app.url("/api/apps"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn patch(app: &TestApp, name: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let resp = app
        .http
        .patch(app.url(&format!("/api/apps/{name}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_app_runs_on_distinct_workers_scales_rolls_and_goes_leaving_exactly_what_is_wanted() {
    let app = spawn_app(3).await;
    let (status, created) = create(
        &app,
        json!({"name": "web", "image": IMAGE, "replicas": 2, "port": 8080,
               "env": {"GREETING": "it's \"$(touch /tmp/pwned)\"\nsecond line"}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["replicas"], 2);
    assert_eq!(
        created["env"],
        json!(["GREETING"]),
        "values are never shown"
    );

    let view = wait_app(&app, "web", Duration::from_secs(60), |v| v["ready"] == 2).await;
    let instances = running(&view);
    assert_ne!(instances[0]["worker"], instances[1]["worker"], "{view}");
    for i in &instances {
        let answer = ask_until_up(i["host"].as_str().unwrap(), i["port"].as_u64().unwrap()).await;
        assert_eq!(answer["instance"], i["id"].to_string(), "{answer}");
        assert_eq!(answer["app"], "web");
    }
    assert_eq!(containers(&app).len(), 2);
    // Bounded: the configured CPU share, memory, processes, and log size; its own uid.
    let limits = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}} \
         {{index .HostConfig.LogConfig.Config \"max-size\"}} {{.Config.User}}",
        instances[0]["container"].as_str().unwrap(),
    ]);
    assert_eq!(
        limits,
        "1000000000 268435456 256 10485760 1000000001:1000000001"
    );
    for w in &app.workers {
        assert_eq!(w.exec("ls /tmp/pwned 2>/dev/null || echo absent"), "absent");
    }

    // A container with Orion's labels but unknown to Orion is removed; one without them
    // is left alone.
    let node = &app.workers[2].container;
    let intruder = format!("{node}.web.999999");
    let stranger = format!("{node}-stranger");
    let join = format!("container:{node}");
    docker(&[
        "run",
        "-d",
        "--name",
        &intruder,
        "--label",
        &format!("orion.node={node}"),
        "--label",
        "orion.app=web",
        "--label",
        "orion.instance=999999",
        "--network",
        &join,
        "--pid",
        &join,
        "--entrypoint",
        "sleep",
        IMAGE,
        "600",
    ]);
    docker(&[
        "run",
        "-d",
        "--name",
        &stranger,
        "--label",
        "orion.test=1",
        "--network",
        &join,
        "--entrypoint",
        "sleep",
        IMAGE,
        "600",
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while containers(&app).iter().any(|(n, _)| n == &intruder) {
        assert!(
            Instant::now() < deadline,
            "the unknown container was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &stranger]),
        "true"
    );
    docker(&["rm", "-f", &stranger]);

    // Scale up: a third instance on the third worker.
    let (status, _) = patch(&app, "web", json!({"replicas": 3})).await;
    assert_eq!(status, 200);
    let view = wait_app(&app, "web", Duration::from_secs(60), |v| v["ready"] == 3).await;
    let mut workers: Vec<&str> = running(&view)
        .iter()
        .map(|i| i["worker"].as_str().unwrap())
        .collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 3, "{view}");

    // Roll to a new image (the same image under another tag): one at a time, never
    // fewer than 2 running.
    docker(&["tag", IMAGE, "orion/demo-app:v2"]);
    let (status, _) = patch(
        &app,
        "web",
        json!({"replicas": 2, "image": "orion/demo-app:v2"}),
    )
    .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, v) = app.get_json("/api/apps/web").await;
        let instances = v["instances"].as_array().unwrap();
        let new_running = instances
            .iter()
            .filter(|i| i["status"] == "running" && i["generation"] == 2)
            .count();
        let any_running = instances
            .iter()
            .filter(|i| i["status"] == "running")
            .count();
        assert!(any_running >= 1, "the roll left nothing running: {v}");
        if new_running == 2 && instances.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the roll never finished: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while containers(&app).len() != 2 {
        assert!(
            Instant::now() < deadline,
            "old containers left: {:?}",
            containers(&app)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Scale to zero, then delete: nothing left, the name is free again.
    let (status, _) = patch(&app, "web", json!({"replicas": 0})).await;
    assert_eq!(status, 200);
    wait_app(&app, "web", Duration::from_secs(30), |v| {
        v["instances"].as_array().unwrap().is_empty()
    })
    .await;
    assert!(containers(&app).is_empty(), "{:?}", containers(&app));
    let resp = app
        .http
        .delete(app.url("/api/apps/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (status, _) = app.get_json("/api/apps/web").await;
    assert_eq!(status, 404);
    let (status, _) = create(&app, json!({"name": "web", "image": IMAGE})).await;
    assert_eq!(status, 201, "a deleted app's name is free again");
    let resp = app
        .http
        .delete(app.url("/api/apps/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containers(&app).is_empty() || app.count("SELECT COUNT(*) FROM apps").await > 0 {
        assert!(
            Instant::now() < deadline,
            "a deleted app left {:?}",
            containers(&app)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_instance_removed_by_hand_runs_again_at_once() {
    let app = spawn_app(2).await;
    let (status, _) = create(&app, json!({"name": "heal", "image": IMAGE, "port": 8080})).await;
    assert_eq!(status, 201);
    let view = wait_app(&app, "heal", Duration::from_secs(60), |v| v["ready"] == 1).await;
    let instance = running(&view)[0].clone();
    let container = instance["container"].as_str().unwrap().to_owned();
    let (host, port) = (instance["host"].as_str().unwrap().to_owned(), 8080);
    ask_until_up(&host, port).await;

    let killed = Instant::now();
    docker(&["rm", "-f", &container]);
    // Answering HTTP again, from the same instance (same id, restarted in place).
    let deadline = killed + Duration::from_secs(20);
    let healed = loop {
        if let Ok(answer) = ask(&host, port).await
            && answer["instance"].as_str() == Some(instance["id"].to_string().as_str())
        {
            break killed.elapsed();
        }
        assert!(Instant::now() < deadline, "the instance never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("self-heal after rm -f: {} ms", healed.as_millis());
    let view = wait_app(&app, "heal", Duration::from_secs(10), |v| v["ready"] == 1).await;
    assert_eq!(view["instances"][0]["restarts"], 1, "{view}");
    assert_eq!(view["instances"][0]["id"], instance["id"]);
}

#[tokio::test]
async fn a_crashing_instance_is_restarted_with_a_back_off_and_shows_why() {
    let app = spawn_app(1).await;
    let (status, _) = create(
        &app,
        json!({"name": "crash", "image": IMAGE, "env": {"DEMO_EXIT_AFTER": "0"}}),
    )
    .await;
    assert_eq!(status, 201);
    // Exits at once: restarted at once, then held back 10 s: crash-looping, with its
    // exit code and the tail of its log.
    let view = wait_app(&app, "crash", Duration::from_secs(60), |v| {
        v["instances"][0]["status"] == "crashloop"
    })
    .await;
    let i = &view["instances"][0];
    assert_eq!(i["exit_code"], 3, "{view}");
    assert!(i["restarts"].as_u64().unwrap() >= 1, "{view}");
    assert!(
        i["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("exiting with 3"),
        "{view}"
    );
    let logs = app
        .http
        .get(app.url("/api/apps/crash/logs?lines=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    assert!(logs.text().await.unwrap().contains("exiting with 3"));
}

#[tokio::test]
async fn a_stopped_worker_s_instance_moves_and_the_worker_is_fenced_when_it_returns() {
    // The drill's own detection settings, as the failover drill uses them.
    let app = spawn_app_with(
        3,
        Box::new(|c| {
            c.health.dead_after = 3;
            c.health.retry_delay = Duration::from_millis(300);
        }),
    )
    .await;
    let (status, _) = create(&app, json!({"name": "move", "image": IMAGE, "port": 8080})).await;
    assert_eq!(status, 201);
    let view = wait_app(&app, "move", Duration::from_secs(60), |v| v["ready"] == 1).await;
    let first = running(&view)[0].clone();
    let stale = first["container"].as_str().unwrap().to_owned();
    let worker = app.worker(first["worker"].as_str().unwrap());

    let stopped = Instant::now();
    worker.stop();
    let view = wait_app(&app, "move", Duration::from_secs(30), |v| {
        running(v).iter().any(|i| i["worker"] != first["worker"])
    })
    .await;
    let moved = stopped.elapsed();
    let second = running(&view)[0].clone();
    let answer = ask_until_up(second["host"].as_str().unwrap(), 8080).await;
    assert_eq!(answer["instance"], second["id"].to_string());
    println!(
        "instance running elsewhere {} ms after docker stop",
        moved.as_millis()
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Status}}", &stale]),
        "exited",
        "the stopped worker took its instance with it"
    );

    // Back: its stale instance is removed, and nothing runs there twice.
    worker.start();
    // The probe round that finds it alive again (this configuration's rounds are an hour
    // apart: the test runs one).
    orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while containers(&app).iter().any(|(n, _)| n == &stale) {
        assert!(
            Instant::now() < deadline,
            "the stale instance was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = wait_app(&app, "move", Duration::from_secs(10), |v| v["ready"] == 1).await;
    assert_eq!(view["instances"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(containers(&app).len(), 1);
}

#[tokio::test]
async fn hostile_app_input_is_refused_and_nothing_runs_anywhere() {
    let app = spawn_app(1).await;
    let long = "a".repeat(5000);
    let bodies = [
        json!({"image": IMAGE}),
        json!({"name": "web"}),
        json!({"name": "web;rm -rf /", "image": IMAGE}),
        json!({"name": "Web", "image": IMAGE}),
        json!({"name": "web\nx", "image": IMAGE}),
        json!({"name": "web", "image": "orion/demo-app; touch /tmp/pwned"}),
        json!({"name": "web", "image": "$(touch /tmp/pwned)"}),
        json!({"name": "web", "image": IMAGE, "replicas": 1000}),
        json!({"name": "web", "image": IMAGE, "replicas": -1}),
        json!({"name": "web", "image": IMAGE, "port": 22}),
        json!({"name": "web", "image": IMAGE, "port": 99999}),
        json!({"name": "web", "image": IMAGE, "env": {"A;B": "x"}}),
        json!({"name": "web", "image": IMAGE, "env": {"ORION_INSTANCE": "7"}}),
        json!({"name": "web", "image": IMAGE, "env": {"X": long}}),
        json!({"name": "web", "image": IMAGE, "command": []}),
        json!({"name": "web", "image": IMAGE, "command": ["sh", "a\u{0}b"]}),
        json!({"name": "web", "image": IMAGE, "privileged": true}),
    ];
    for body in bodies {
        let (status, answer) = create(&app, body.clone()).await;
        assert!(status.is_client_error(), "{body} answered {status}");
        assert!(answer["error"]["message"].is_string(), "{body}: {answer}");
    }
    let (status, _) = patch(&app, "nope", json!({"replicas": 1})).await;
    assert_eq!(status, 404);
    assert_eq!(app.count("SELECT COUNT(*) FROM apps").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM instances").await, 0);
    assert!(containers(&app).is_empty());
    assert_eq!(
        app.workers[0].exec("ls /tmp/pwned 2>/dev/null || echo absent"),
        "absent"
    );
}

#[tokio::test]
async fn tenants_see_only_their_own_apps_and_cannot_reach_the_engine() {
    let app = spawn_app(1).await;
    let (_, alice) = app.tenant_token_with(json!({"tenant": "alice"})).await;
    let (_, bob) = app.tenant_token_with(json!({"tenant": "bob"})).await;
    let alice_http = orion::testkit::client_with_token(&alice);
    let bob_http = orion::testkit::client_with_token(&bob);
    let resp = alice_http
        .post(app.url("/api/apps"))
        .json(&json!({"name": "web", "image": IMAGE, "replicas": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // Bob cannot see, change or delete Alice's app.
    let resp = bob_http.get(app.url("/api/apps/web")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = bob_http
        .delete(app.url("/api/apps/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let list: Value = bob_http
        .get(app.url("/api/apps"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["apps"], json!([]));
    let resp = bob_http
        .get(app.url("/api/apps/web?tenant=alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // A tenant's quota of instances holds.
    let resp = bob_http
        .post(app.url("/api/apps"))
        .json(&json!({"name": "big", "image": IMAGE, "replicas": 21}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);

    // The attack: a tenant logged in on the worker tries the engine's socket and the
    // wrapper that holds it.
    let (key, public) = tenant_key();
    let rental = app.rent_ok(json!({"ssh_public_key": public})).await;
    let target = orion::ssh::Target {
        name: "tenant".into(),
        host: rental["host"].as_str().unwrap().to_owned(),
        port: rental["port"].as_u64().unwrap() as u16,
        host_key: None,
    };
    let user = rental["username"].as_str().unwrap();
    let session = app
        .tenant_ssh
        .connect_as(&target, user, Auth::Key(key))
        .await
        .unwrap();
    let attempt = |command: &'static str| {
        let session = &session;
        async move { session.exec(command, None).await.unwrap() }
    };
    let socket = attempt(
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); \
         s.connect(\"/var/lib/orion/runtime/docker.sock\"); print(\"connected\")'",
    )
    .await;
    assert!(!socket.stdout.contains("connected"), "{socket:?}");
    assert!(socket.stderr.contains("Permission denied"), "{socket:?}");
    let wrapper = attempt("/usr/local/sbin/orion-runtime ps x").await;
    assert!(!wrapper.success(), "{wrapper:?}");
    assert!(wrapper.stderr.contains("Permission denied"), "{wrapper:?}");
    session.close().await;
}

#[tokio::test]
async fn the_ansible_twins_run_and_remove_instances_as_the_shell_ones_do() {
    let app = spawn_app_with(
        2,
        Box::new(|c| c.provisioning.executor = orion::config::ExecutorKind::Ansible),
    )
    .await;
    let (status, _) = create(
        &app,
        json!({"name": "twin", "image": IMAGE, "replicas": 2, "port": 8080,
               "env": {"TEMPLATE": "{{ lookup('pipe', 'touch /tmp/pwned') }}"}}),
    )
    .await;
    assert_eq!(status, 201);
    let view = wait_app(&app, "twin", Duration::from_secs(90), |v| v["ready"] == 2).await;
    for i in running(&view) {
        ask_until_up(i["host"].as_str().unwrap(), 8080).await;
    }
    for w in &app.workers {
        assert_eq!(w.exec("ls /tmp/pwned 2>/dev/null || echo absent"), "absent");
    }
    assert!(
        !std::path::Path::new("/tmp/pwned").exists(),
        "templated on Orion's side"
    );
    let (status, _) = patch(&app, "twin", json!({"replicas": 1})).await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers(&app).len() != 1 {
        assert!(Instant::now() < deadline, "{:?}", containers(&app));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_worker_paused_for_less_than_the_death_threshold_moves_nothing() {
    let app = spawn_app_with(
        2,
        Box::new(|c| {
            c.health.dead_after = 3;
            c.health.retry_delay = Duration::from_millis(300);
        }),
    )
    .await;
    let (status, _) = create(&app, json!({"name": "calm", "image": IMAGE})).await;
    assert_eq!(status, 201);
    let view = wait_app(&app, "calm", Duration::from_secs(60), |v| v["ready"] == 1).await;
    let before = running(&view)[0].clone();
    let worker = app.worker(before["worker"].as_str().unwrap());
    docker(&["pause", &worker.container]);
    // Shorter than keepalive_interval × (keepalive_max + 1) (5 s × 4): no keepalive
    // goes unanswered long enough for a probe to start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker(&["unpause", &worker.container]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, after) = app.get_json("/api/apps/calm").await;
    assert_eq!(after["instances"].as_array().unwrap().len(), 1, "{after}");
    assert_eq!(after["instances"][0]["id"], before["id"], "{after}");
    assert_eq!(after["instances"][0]["status"], "running", "{after}");
    assert_eq!(after["instances"][0]["restarts"], 0, "{after}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'instance.lost'")
            .await,
        0
    );
    assert_eq!(
        app.worker_row(&worker.name).await.status,
        orion::model::WorkerStatus::Alive
    );
}

#[tokio::test]
async fn most_workers_lost_at_once_hold_every_instance_where_it_is() {
    let app = spawn_app_with(
        3,
        Box::new(|c| {
            c.health.dead_after = 2;
            c.health.retry_delay = Duration::from_millis(200);
        }),
    )
    .await;
    let (status, _) = create(&app, json!({"name": "held", "image": IMAGE, "replicas": 3})).await;
    assert_eq!(status, 201);
    let view = wait_app(&app, "held", Duration::from_secs(60), |v| v["ready"] == 3).await;
    let ids: Vec<Value> = running(&view).iter().map(|i| i["id"].clone()).collect();
    // Two workers of three die at once: more than migration.max_dead_fraction (0.5),
    // which looks like Orion cut off rather than the fleet dying.
    app.workers[0].stop();
    app.workers[1].stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app
        .count("SELECT COUNT(*) FROM workers WHERE status = 'dead'")
        .await
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the stopped workers were never declared dead"
        );
        orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
            .await
            .unwrap();
    }
    // Pass after pass, nothing is declared lost, placed or stopped.
    for _ in 0..3 {
        let summary = orion::loops::apps::apps_pass(&app.ctx, &app.loops.apps)
            .await
            .unwrap();
        assert!(summary.held, "{summary:?}");
        assert_eq!(
            (
                summary.lost,
                summary.placed,
                summary.stopped,
                summary.removed
            ),
            (0, 0, 0, 0),
            "{summary:?}"
        );
    }
    let (_, after) = app.get_json("/api/apps/held").await;
    let still: Vec<Value> = after["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    assert_eq!(still, ids, "nothing was declared lost or moved: {after}");
    assert!(
        after["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] != "stopping"),
        "{after}"
    );
    let survivor = &app.workers[2].container;
    assert_eq!(
        docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=orion.node={survivor}")
        ])
        .lines()
        .count(),
        1,
        "the surviving worker keeps its instance running"
    );
    // Said once, whichever pass (the running loop's or this test's) held first.
    assert_eq!(
        app.count("SELECT COUNT(*) FROM events WHERE kind = 'apps.held'")
            .await,
        1
    );
}

#[tokio::test]
async fn one_tenants_app_cannot_read_another_apps_secrets_on_the_same_worker() {
    let app = spawn_app(1).await;
    let (_, alice) = app.tenant_token_with(json!({"tenant": "alice"})).await;
    let (_, bob) = app.tenant_token_with(json!({"tenant": "bob"})).await;
    let post = |token: String, body: Value| {
        let url = app.url("/api/apps");
        async move {
            orion::testkit::client_with_token(&token)
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let status = post(
        alice,
        json!({"name": "vault", "image": IMAGE, "env": {"VAULT_SECRET": "s3cr3t-of-alice"}}),
    )
    .await;
    assert_eq!(status, 201);
    wait_app(&app, "vault?tenant=alice", Duration::from_secs(60), |v| {
        v["ready"] == 1
    })
    .await;
    // The attacker's app shares the worker (and, in the lab, its PID namespace): it
    // reads every process's environment it can, and tries to kill the others.
    let snoop = "for p in /proc/[0-9]*; do tr '\\0' '\\n' 2>/dev/null < $p/environ; done 2>/dev/null \
                 | grep -c VAULT_SECRET; \
                 for p in /proc/[0-9]*; do n=${p#/proc/}; [ \"$n\" = \"$$\" ] || kill -9 \"$n\" 2>/dev/null; done; \
                 exec sleep 600";
    let status = post(
        bob,
        json!({"name": "snoop", "image": IMAGE, "command": ["sh", "-c", snoop]}),
    )
    .await;
    assert_eq!(status, 201);
    wait_app(&app, "snoop?tenant=bob", Duration::from_secs(60), |v| {
        v["ready"] == 1
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        let resp = app
            .http
            .get(app.url("/api/apps/snoop/logs?tenant=bob"))
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        if !text.trim().is_empty() || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        logs.trim(),
        "0",
        "the snoop read another app's environment: {logs}"
    );
    let (_, vault) = app.get_json("/api/apps/vault?tenant=alice").await;
    assert_eq!(vault["instances"][0]["status"], "running", "{vault}");
    assert_eq!(
        vault["instances"][0]["restarts"], 0,
        "killed by the snoop: {vault}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_take_a_tenant_past_its_instance_quota() {
    let app = spawn_app(1).await;
    let (_, token) = app.tenant_token_with(json!({"tenant": "greedy"})).await;
    let http = orion::testkit::client_with_token(&token);
    // 20 instances in all (apps.max_instances_per_tenant): 10 creates of 3 at once may
    // only ever give 6 apps.
    let creates = (0..10).map(|i| {
        let (http, url) = (http.clone(), app.url("/api/apps"));
        async move {
            http.post(url)
                .json(&json!({"name": format!("g{i}"), "image": IMAGE, "replicas": 3}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let mut statuses = futures::future::join_all(creates).await;
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 201, 201, 201, 201, 201, 429, 429, 429, 429]);
    let asked = app
        .count("SELECT CAST(SUM(replicas) AS SIGNED) FROM apps WHERE tenant = 'greedy'")
        .await;
    assert_eq!(asked, 18);
}
