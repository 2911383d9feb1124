//! Apps that try to make their worker unmanageable, played against a real worker and the
//! real container engine.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::apps::{containers, create, running, wait_app};
use crate::helpers::spawn_app;

const FAT_IMAGE: &str = "orion/test-fat-labels:latest";

/// Builds [`FAT_IMAGE`]: the demo app with about 96 KiB of labels, more than Orion keeps of
/// one command's output, one of them under Orion's own `orion.` prefix.
fn build_fat_image() {
    let mut dockerfile = String::from("FROM orion/demo-app:latest\n");
    for i in 0..96 {
        dockerfile.push_str(&format!("LABEL fat.label{i}=\"{}\"\n", "x".repeat(1000)));
    }
    dockerfile.push_str(&format!("LABEL orion.padding=\"{}\"\n", "y".repeat(8000)));
    let mut build = Command::new("docker")
        .args(["build", "-q", "-t", FAT_IMAGE, "-"])
        // The classic builder takes FROM from local images, as scripts/images.sh does.
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run docker build");
    build
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_image_with_huge_labels_leaves_its_worker_manageable_for_every_other_app() {
    build_fat_image();
    let app = spawn_app(1).await;
    let worker = &app.workers[0];
    let image = "orion/demo-app:latest";

    let (status, body) = create(&app, on_port("gone", image, 8081)).await;
    assert_eq!(status, 201, "{body}");
    let view = wait_app(&app, "gone", Duration::from_secs(60), |v| {
        running(v).len() == 1
    })
    .await;
    let gone = view["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_owned();

    // The attack: an app whose image carries more labels than Orion reads of `ps`.
    let (status, body) = create(&app, on_port("fat", FAT_IMAGE, 8082)).await;
    assert_eq!(status, 201, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !containers(&app)
        .iter()
        .any(|(n, s)| n.contains(".fat.") && s == "running")
    {
        assert!(
            Instant::now() < deadline,
            "the fat app never started: {:?}",
            containers(&app)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The worker's other apps are still managed: a deleted one goes, a new one comes.
    let resp = app
        .http
        .delete(app.url("/api/apps/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (status, body) = create(&app, on_port("late", image, 8083)).await;
    assert_eq!(status, 201, "{body}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while containers(&app).iter().any(|(n, _)| n == &gone) {
        assert!(
            Instant::now() < deadline,
            "the deleted app's container still runs: {:?}; `orion-runtime ps` answers {} bytes",
            containers(&app),
            ps(worker).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_app(&app, "late", Duration::from_secs(30), |v| {
        running(v).len() == 1
    })
    .await;
    wait_app(&app, "fat", Duration::from_secs(30), |v| {
        running(v).len() == 1
    })
    .await;

    // What the worker reports of its containers is Orion's own, bounded: none of the
    // image's labels, not even those under Orion's prefix.
    let listed = ps(worker);
    assert!(listed.len() < 4096, "{} bytes: {listed}", listed.len());
    assert!(!listed.contains("fat.label"), "{listed}");
    assert!(!listed.contains("orion.padding"), "{listed}");
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
}

/// An app of one instance listening on `port` (instances share their worker's network).
fn on_port(name: &str, image: &str, port: u16) -> Value {
    json!({"name": name, "image": image, "port": port, "env": {"PORT": port.to_string()}})
}

/// What `orion-runtime ps` answers on the worker, run as Orion runs it (root).
fn ps(worker: &crate::helpers::Worker) -> String {
    worker.exec(&format!(
        "/usr/local/sbin/orion-runtime ps {}",
        worker.container
    ))
}
