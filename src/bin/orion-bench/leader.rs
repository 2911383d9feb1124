//! Leader takeover: two `orion` processes on one database; the leading one is killed
//! (every task dropped, nothing handed over, as `docker kill`), and the clock runs until
//! the other leads. Then a fresh replica joins and the drill repeats.

use std::time::{Duration, Instant};

use anyhow::bail;
use orion::testkit::spawn_app;

use crate::report;

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let mut app = spawn_app(1).await;
    let lease = app.ctx.config.leader.lease;
    let renew = app.ctx.config.leader.renew_every;
    println!(
        "leader takeover: {runs} kills of the leading process, lease {lease:?}, renew every {renew:?}"
    );
    let mut standby = app.start_replica().await;
    let mut takeovers = Vec::new();
    // The first kill is of the test app's own process; later ones of replicas.
    let killed = Instant::now();
    app.kill().await;
    takeovers.push(wait_leading(&standby.ctx.leader, killed).await?);
    for _ in 1..runs {
        let next = app.start_replica().await;
        let killed = Instant::now();
        standby.kill().await;
        takeovers.push(wait_leading(&next.ctx.leader, killed).await?);
        standby = next;
    }
    for (i, t) in takeovers.iter().enumerate() {
        println!(
            "run {:>2}: kill → the other process leads: {:>5} ms",
            i + 1,
            t.as_millis()
        );
    }
    println!();
    report::line("kill → new leader", &mut takeovers);
    Ok(())
}

async fn wait_leading(
    leader: &orion::leader::Leadership,
    since: Instant,
) -> anyhow::Result<Duration> {
    while !leader.is_leading() {
        if since.elapsed() > Duration::from_secs(30) {
            bail!("no takeover within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(since.elapsed())
}
