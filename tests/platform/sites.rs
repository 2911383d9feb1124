//! The drills of a two-site platform (`scripts/platform.sh up --sites 2 3`): workers on
//! two Docker networks, `a` and `b`, Orion attached to both, Caddy in front. One platform
//! serves every drill, one after the other:
//!
//! 1. an app of 2 replicas spread over both sites and a rental on site a; **every worker
//!    of site a stopped** at once, under load through Caddy: the rental and the app's
//!    instance move to site b, and the failed requests are counted; the site's return
//!    fences its workers (the tenant's leftover account removed before reuse), and the
//!    app spreads over both sites again;
//! 2. Orion **cut from every site** at once (`platform.sh cut all`, a network
//!    disconnect): nothing moves, an event says why; healed, everything stays put;
//! 3. a worker added to the running platform (`workers.sh up 4 --site b`, the inventory
//!    reloaded on SIGHUP) is rented out with no restart; retired through the API while
//!    rented, its tenant moves first.
//!
//! Times are printed (`--nocapture` shows them); the figures to compare are the
//! benchmark's (`scripts/bench.sh sites`, docs/benchmarks.md).

use std::path::Path;
use std::time::{Duration, Instant};

use orion::testkit::platform::{Platform, get_json};
use orion::testkit::{docker, tenant_key};
use serde_json::{Value, json};

use crate::{tenant_login, wait_for};

const PROJECT: &str = "orion-sites-e2e";
const PER_SITE: u16 = 3;

#[tokio::test]
async fn a_lost_site_moves_to_the_other_a_cut_holds_and_workers_join_live() {
    let platform = Platform::with_sites(
        PROJECT,
        2,
        PER_SITE + 1,
        Path::new(env!("CARGO_BIN_EXE_orion")),
    );
    platform.script(&["down", "--volumes"]);
    assert!(
        platform.script(&["up", "--sites", "2", &PER_SITE.to_string()]),
        "scripts/platform.sh up --sites 2 failed"
    );
    let http = platform.client();
    let base = platform.base();
    platform
        .free_workers(&http, 2 * PER_SITE as usize, Duration::from_secs(120))
        .await;
    let sites = platform.sites(&http).await;
    assert_eq!(
        sites.values().filter(|s| *s == "a").count(),
        PER_SITE as usize,
        "{sites:?}"
    );

    // Orion is on every site's network (it reaches the workers there), but a worker
    // reaching Orion's API port directly, with a forged X-Forwarded-For, is refused:
    // only Caddy may reach the API (#24).
    let worker = platform.site_containers("a", PER_SITE)[0].clone();
    let orion = platform.container("orion");
    let script = format!(
        "import urllib.request, urllib.error\n\
         r = urllib.request.Request('http://{orion}:8080/api/workers', \
             headers={{'X-Forwarded-For': '203.0.113.9', 'Authorization': 'Bearer x'}})\n\
         try:\n    print(urllib.request.urlopen(r, timeout=5).status)\n\
         except urllib.error.HTTPError as e:\n    print(e.code)\n"
    );
    let answer = docker(&["exec", &worker, "python3", "-c", &script]);
    assert_eq!(
        answer.trim(),
        "403",
        "a worker reached Orion's API directly"
    );

    // An app of 2 replicas: one instance on each site.
    let resp = http
        .post(format!("{base}/api/apps"))
        .json(&json!({"name": "drill", "image": "orion/demo-app:latest", "replicas": 2, "port": 8080}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    wait_for("one instance per site", Duration::from_secs(120), || {
        let (platform, http, sites) = (&platform, http.clone(), sites.clone());
        async move { platform.app_sites(&http, "drill", &sites).await == ["a", "b"] }
    })
    .await;
    let app_url = platform.app_url("drill");
    wait_for("the app through Caddy", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), app_url.clone());
        async move { get_json(&http, &url).await["app"] == "drill" }
    })
    .await;

    // A rental on site a.
    let (key, public) = tenant_key();
    let rented: Value = http
        .post(format!("{base}/api/rent"))
        .json(&json!({"site": "a", "username": "ada", "ssh_public_key": public}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rented["site"], "a", "{rented}");
    let id = rented["id"].as_str().unwrap().to_owned();
    let first = rented["worker"].as_str().unwrap().to_owned();
    let endpoint = rented["endpoint"]["port"].as_u64().unwrap() as u16;
    assert_eq!(
        tenant_login(endpoint, "ada", key.clone()).await.as_deref(),
        Ok("ada")
    );

    // 1. Site a lost, under load through Caddy.
    let site_a = platform.site_containers("a", PER_SITE);
    let loss = platform
        .lose_site(&http, "a", &site_a, std::slice::from_ref(&id), "drill", 2)
        .await;
    let (ok, failed) = (loss.answered, loss.failed);
    println!(
        "site a lost: rental active on b after {:?}, app on b after {:?}; requests through \
         Caddy: {ok} answered, {failed} failed",
        loss.rentals_moved, loss.instances_moved
    );
    assert!(
        ok > 0 && failed * 10 <= ok,
        "{failed} of {} requests failed",
        ok + failed
    );
    assert_eq!(
        tenant_login(endpoint, "ada", key.clone()).await.as_deref(),
        Ok("ada"),
        "the same endpoint and key reach the tenant on site b"
    );
    let lost = platform.events(&http, "site.lost").await;
    assert!(
        lost.iter().any(|m| m.starts_with("site a lost")),
        "{lost:?}"
    );

    // Site a returns: its workers are fenced before reuse.
    platform
        .restore_site(&http, &site_a, PER_SITE as usize)
        .await;
    let old = platform.worker(&first);
    wait_for(
        "the tenant's account gone from its old worker",
        Duration::from_secs(90),
        || {
            let old = old.clone();
            async move {
                std::process::Command::new("docker")
                    .args(["exec", &old, "getent", "passwd", "ada"])
                    .output()
                    .is_ok_and(|o| o.status.code() == Some(2))
            }
        },
    )
    .await;
    wait_for(
        "the app spread over both sites again",
        Duration::from_secs(120),
        || {
            let (platform, http, sites) = (&platform, http.clone(), sites.clone());
            async move { platform.app_sites(&http, "drill", &sites).await == ["a", "b"] }
        },
    )
    .await;
    wait_for("site a said back", Duration::from_secs(30), || {
        let (platform, http) = (&platform, http.clone());
        async move { !platform.events(&http, "site.back").await.is_empty() }
    })
    .await;

    // 2. Orion cut from every site at once: nothing moves.
    let now_on = get_json(&http, &format!("{base}/api/rentals/{id}")).await["worker"].clone();
    assert!(platform.script(&["cut", "all"]));
    wait_for("the hold said", Duration::from_secs(90), || {
        let (platform, http) = (&platform, http.clone());
        async move {
            platform
                .events(&http, "migration.held")
                .await
                .iter()
                .any(|m| m.contains("every site"))
        }
    })
    .await;
    let during = get_json(&http, &format!("{base}/api/rentals/{id}")).await;
    assert_eq!(
        (&during["status"], &during["worker"]),
        (&json!("active"), &now_on)
    );
    assert!(platform.script(&["heal", "all"]));
    platform
        .free_workers(&http, PER_SITE as usize, Duration::from_secs(90))
        .await;
    let after = get_json(&http, &format!("{base}/api/rentals/{id}")).await;
    assert_eq!(
        (&after["status"], &after["worker"]),
        (&json!("active"), &now_on),
        "nothing moved"
    );
    assert_eq!(
        tenant_login(endpoint, "ada", key.clone()).await.as_deref(),
        Ok("ada")
    );

    // 3. A worker joins the running platform, and is rented out with no restart.
    let grown = Instant::now();
    assert!(platform.workers_script(&["up", &(PER_SITE + 1).to_string(), "--site", "b"]));
    let new_worker = format!("worker_b_{}", PER_SITE + 1);
    wait_for("the new worker alive", Duration::from_secs(60), || {
        let (platform, http, name) = (&platform, http.clone(), new_worker.clone());
        async move {
            let fleet = get_json(&http, &format!("{}/api/workers", platform.base())).await;
            fleet["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["name"] == name.as_str() && w["status"] == "alive")
            })
        }
    })
    .await;
    println!(
        "a worker added live was alive {:?} after workers.sh up",
        grown.elapsed()
    );
    // Rents on site b until one lands on the new worker (the others there are free too,
    // some hosting the app's instances): it is rented out before site b is full.
    let mut on_b = Vec::new();
    for user in ["ben", "bea", "bob", "bud"] {
        let resp = http
            .post(format!("{base}/api/rent"))
            .json(&json!({"site": "b", "username": user}))
            .send()
            .await
            .unwrap();
        let rented: Value = resp.json().await.unwrap();
        let done = rented["worker"] == new_worker.as_str() || rented["error"].is_object();
        on_b.push(rented);
        if done {
            break;
        }
    }
    let joined = on_b
        .iter()
        .find(|r| r["worker"] == new_worker.as_str())
        .unwrap_or_else(|| panic!("the new worker was never rented out: {on_b:?}"))
        .clone();
    let orion = platform.containers("orion");
    assert_eq!(orion.len(), 1);
    assert!(
        docker(&["inspect", "-f", "{{.RestartCount}}", &orion[0]]) == "0",
        "orion was not restarted"
    );

    // Retired while rented: its tenant moves first.
    let resp = http
        .delete(format!("{base}/api/workers/{new_worker}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ben = joined["id"].as_str().unwrap().to_owned();
    wait_for(
        "the retired worker's tenant moved",
        Duration::from_secs(60),
        || {
            let (http, url, from) = (
                http.clone(),
                format!("{base}/api/rentals/{ben}"),
                new_worker.clone(),
            );
            async move {
                let r = get_json(&http, &url).await;
                r["status"] == "active" && r["worker"] != from.as_str()
            }
        },
    )
    .await;
}
