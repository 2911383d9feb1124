use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_events_log_is_paged_and_streamed_live() {
    let app = spawn_app(1).await;
    let (status, page) = app.get_json("/api/events?limit=2").await;
    assert_eq!(status, 200);
    let first = page["events"].as_array().unwrap();
    assert_eq!(first.len(), 2);
    let next = page["next"].as_u64().unwrap();
    let (_, rest) = app.get_json(&format!("/api/events?after={next}")).await;
    assert!(
        rest["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"].as_u64().unwrap() > next)
    );
    let (status, _) = app.get_json("/api/events?limit=0").await;
    assert_eq!(status, 422);

    // Live: open the stream, rent, and see the rent's events arrive.
    let mut stream = app
        .http
        .get(app.url("/api/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let rental: Value = app.rent_ok(json!({ "username": "quinn" })).await;
    let id = rental["id"].as_str().unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("event: rental.provisioned") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("the event arrives within 10 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(id), "{seen}");
    assert!(seen.contains("id: "), "{seen}");
}

#[tokio::test]
async fn prometheus_metrics_are_served_to_the_admin_only() {
    let app = spawn_app(1).await;
    assert_eq!(app.rent(json!({})).await.status(), 201);
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    for needle in [
        "orion_workers{status=\"alive\"} 1",
        "orion_workers{status=\"allocated\"} 1",
        "orion_rentals{status=\"active\"} 1",
        "orion_rents_total{outcome=\"created\"}",
        "orion_rent_duration_seconds_bucket",
        "orion_probe_duration_seconds_bucket",
        "orion_loop_last_success_timestamp_seconds{loop=\"health\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    let anonymous = reqwest::Client::new();
    assert_eq!(
        anonymous
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}
