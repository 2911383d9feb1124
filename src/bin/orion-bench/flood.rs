//! A tenant's rent while one address floods the API with junk tokens: the rate limit
//! must answer the flood (429, no database lookup) without slowing the rent down.
//!
//! In-process Orion on loopback with its default `[http]` limits and 2 real sshd
//! workers; each run sends `flood` concurrent requests with an unknown token from
//! 127.0.0.1 and, while they are in flight, one rent with a tenant token from another
//! client address (an `X-Forwarded-For` entry: loopback is a trusted proxy, as Caddy is
//! on the platform), timed to its 201; then the rental is released. The same rent
//! without a flood is timed first, for comparison. Every request goes to loopback, with
//! a timeout; nothing is sent anywhere else.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use orion::testkit::{client_with_token, spawn_app_with};
use serde_json::{Value, json};

use crate::report;

/// Bound on any one request of the benchmark.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(runs: usize, flood: usize) -> anyhow::Result<()> {
    if runs == 0 || flood == 0 || flood > 5000 {
        bail!("--runs must be at least 1 and --flood between 1 and 5000");
    }
    let app = spawn_app_with(2, Box::new(|_| {})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.ctx.ssh.watched() < app.workers.len() {
        if Instant::now() > deadline {
            bail!("the watch sessions did not open within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = &app.ctx.config.http;
    println!(
        "rent during a junk-token flood: {runs} runs, {flood} concurrent junk requests from \
         one address per run, limit burst {} then {}/s, 2 workers, API on loopback",
        http.anonymous_burst, http.anonymous_per_second
    );
    let (_, token) = app.tenant_token("bench").await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse()?);
    headers.insert("x-forwarded-for", "203.0.113.9".parse()?);
    let tenant = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let junk = client_with_token("orn_junkjunkjunkjunkjunkjunkjunkjunk");

    let rent = |n: usize| {
        let tenant = tenant.clone();
        let url = app.url("/api/rent");
        async move {
            let started = Instant::now();
            let resp = tenant
                .post(url)
                .json(&json!({ "username": format!("flood{n}") }))
                .send()
                .await?;
            let took = started.elapsed();
            if resp.status() != 201 {
                bail!("rent {n}: {} {}", resp.status(), resp.text().await?);
            }
            let rental: Value = resp.json().await?;
            let id = rental["id"].as_str().context("rental id")?.to_owned();
            anyhow::Ok((took, id))
        }
    };
    let release = |id: String| {
        let tenant = tenant.clone();
        let url = app.url(&format!("/api/rentals/{id}"));
        async move {
            let status = tenant.delete(url).send().await?.status();
            if status != 204 {
                bail!("release {id}: {status}");
            }
            anyhow::Ok(())
        }
    };

    let mut quiet = Vec::new();
    for n in 0..runs {
        let (took, id) = rent(n).await?;
        quiet.push(took);
        release(id).await?;
    }

    let (mut during, mut floods) = (Vec::new(), Vec::new());
    let (mut limited, mut unauthorized) = (0usize, 0usize);
    let progress = orion::progress::bar(runs as u64, "rents during a flood");
    for n in runs..2 * runs {
        let flood_started = Instant::now();
        let sent = futures::future::join_all((0..flood).map(|_| {
            junk.get(app.url("/api/rentals"))
                .timeout(REQUEST_TIMEOUT)
                .send()
        }));
        let rented = async {
            // Once the flood's requests are on their way.
            tokio::time::sleep(Duration::from_millis(5)).await;
            rent(n).await
        };
        let (answers, rented) = tokio::join!(sent, rented);
        floods.push(flood_started.elapsed());
        for answer in answers {
            match answer?.status().as_u16() {
                429 => limited += 1,
                401 => unauthorized += 1,
                other => bail!("a junk-token request got {other}"),
            }
        }
        let (took, id) = rented?;
        during.push(took);
        release(id).await?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!();
    report::line("rent → 201, no flood", &mut quiet);
    report::line(
        &format!("rent → 201, during {flood} junk requests"),
        &mut during,
    );
    report::line(&format!("{flood} junk requests all answered"), &mut floods);
    let total = runs * flood;
    println!(
        "junk requests: {limited} of {total} answered 429 before any lookup, \
         {unauthorized} looked up and answered 401"
    );
    let worst = during.iter().max().copied().unwrap_or_default();
    if worst > Duration::from_secs(1) {
        println!(
            "TARGET MISSED: a rent during the flood took {} ms (> 1 s)",
            worst.as_millis()
        );
    }
    Ok(())
}
