//! Hostile clients of the SSH gateway and of the workers' sshd, against real workers: a
//! flood of idle connections at a rental's gateway port, and a flood of connections that
//! never authenticate at a worker's sshd while Orion probes it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{OpenSshTenant, TestApp, spawn_app, spawn_app_with};

/// A TCP connection to `to` from `source`, one of the loopback addresses (the whole of
/// 127.0.0.0/8 is the machine's own): a second client address for the test.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// What became of a connection that sent nothing.
#[derive(Debug)]
struct Fate {
    /// How long after its opening the other end closed it (`None`: still open at the end).
    closed_after: Option<Duration>,
    /// Bytes the other end sent it (a worker's sshd sends its banner at once).
    received: usize,
}

/// Holds `stream` open, sending nothing, until the other end closes it or `limit` passes.
async fn hold(mut stream: TcpStream, opened: Instant, limit: Duration) -> Fate {
    let mut received = 0;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout_at((opened + limit).into(), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    Fate {
        closed_after: closed.ok().map(|()| opened.elapsed()),
        received,
    }
}

/// The sum of a Prometheus counter's series on `/metrics`, `None` if it has none.
async fn counter(app: &TestApp, name: &str, labels: &str) -> Option<f64> {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!series.is_empty()).then(|| series.iter().sum())
}

/// One client that says hello as an SSH client does and reads the worker's banner back
/// through the gateway, then goes.
async fn hello(from: [u8; 4], to: SocketAddr) -> bool {
    let talk = async {
        let mut stream = connect_from(from, to).await.ok()?;
        stream.write_all(b"SSH-2.0-hostile\r\n").await.ok()?;
        let mut banner = [0u8; 8];
        stream.read_exact(&mut banner).await.ok()?;
        Some(&banner == b"SSH-2.0-")
    };
    tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_from_one_address_are_cut_off_while_the_tenant_logs_in_through_the_gateway()
 {
    const FLOOD: usize = 500;
    const HELLOS: usize = 20;
    let app = spawn_app(1).await;
    let limits = app.ctx.config.gateway.clone();
    let (deadline, cap) = (limits.first_bytes_timeout, limits.max_per_source);
    assert!(
        FLOOD > cap * 4 && HELLOS < cap,
        "the test needs a cap well under {FLOOD}"
    );
    let tenant = OpenSshTenant::new(&app, "tina").await;
    let body = app
        .rent_ok(json!({ "ssh_public_key": tenant.public, "username": "tina" }))
        .await;
    let port = body["endpoint"]["port"].as_u64().expect("an endpoint") as u16;
    let gateway = SocketAddr::from(([127, 0, 0, 1], port));

    // The attacker, from 127.0.0.2: FLOOD connections that never send a byte, held
    // until the gateway closes them (at most the deadline and 10 s more).
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        let opened = Instant::now();
        let stream = connect_from([127, 0, 0, 2], gateway)
            .await
            .expect("the gateway's port accepts");
        held.spawn(hold(stream, opened, deadline + Duration::from_secs(10)));
    }

    // Meanwhile the tenant, from 127.0.0.1, logs in through the same port.
    let ran = tenant.ssh("localhost", port, "tina", "whoami").await;
    assert!(
        ran.ok && ran.stdout == "tina",
        "the tenant could not log in during the flood: {}",
        ran.stderr
    );

    let fates = held.join_all().await;
    let received: usize = fates.iter().map(|f| f.received).sum();
    assert_eq!(
        received, 0,
        "idle connections were forwarded to the worker's sshd (it sent them {received} bytes)"
    );
    let at_once = fates
        .iter()
        .filter(|f| f.closed_after.is_some_and(|t| t < Duration::from_secs(1)))
        .count();
    assert!(
        at_once >= FLOOD - cap,
        "only {at_once} of {FLOOD} idle connections from one address were refused at once \
         (per-source cap {cap})"
    );
    let open = fates.iter().filter(|f| f.closed_after.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} idle connections still open 10 s past the first-bytes deadline ({deadline:?})"
    );

    // The port's rental is read from memory: clients that each say hello (from a third
    // address) are all forwarded, for a handful of database reads at most.
    let lookups_before = counter(&app, "orion_gateway_lookups_total", "")
        .await
        .expect("the gateway counts its database lookups");
    let answered = futures::future::join_all((0..HELLOS).map(|_| hello([127, 0, 0, 3], gateway)))
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    assert_eq!(answered, HELLOS, "every client that spoke was forwarded");
    let lookups = counter(&app, "orion_gateway_lookups_total", "")
        .await
        .unwrap()
        - lookups_before;
    assert!(
        lookups <= 2.0,
        "{lookups} database lookups for {HELLOS} connections to one port"
    );
}

/// Opens connections to a worker's sshd that never send a byte, and keeps them.
async fn preauth_flood(sshd: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut flood = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(sshd)).await
        {
            flood.push(s);
        }
    }
    flood
}

/// Whether a new connection to `sshd` is dropped before the banner (sshd's
/// `MaxStartups`), and what it was told.
async fn dropped_before_banner(sshd: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(sshd).await.ok()?;
    let mut first = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut first)).await;
    let text = String::from_utf8_lossy(&first).into_owned();
    (read.is_ok() && !text.starts_with("SSH-")).then_some(text)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pre_auth_flood_at_a_worker_s_sshd_does_not_get_it_declared_dead() {
    const FLOOD: usize = 300;
    // Every probe opens a new connection, the one a flood can deny.
    let app = spawn_app_with(
        2,
        Box::new(|c| c.health.handshake_every = Duration::from_millis(1)),
    )
    .await;
    let watches = Instant::now() + Duration::from_secs(10);
    while app.ctx.ssh.watched() < 2 {
        assert!(Instant::now() < watches, "the watch sessions never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rental = app.rent_ok(json!({ "username": "vera" })).await;
    let id = rental["id"].as_str().unwrap().to_owned();
    let name = rental["worker"].as_str().unwrap().to_owned();
    let sshd = SocketAddr::from(([127, 0, 0, 1], app.worker(&name).port));

    // The attacker: connections to the worker's sshd that never say anything.
    let flood = preauth_flood(sshd, FLOOD).await;
    let full = Instant::now() + Duration::from_secs(10);
    let told = loop {
        if let Some(told) = dropped_before_banner(sshd).await {
            break told;
        }
        assert!(
            Instant::now() < full,
            "sshd still takes new connections with {} idle ones open",
            flood.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("a new connection was told {told:?}");

    // Orion probes it, several rounds, and would move its rental if it were dead.
    for _ in 0..3 {
        orion::loops::health::probe_round(&app.ctx, &app.loops.probes)
            .await
            .unwrap();
    }
    orion::loops::migration::migration_pass(&app.ctx, &app.loops.migration)
        .await
        .unwrap();
    let worker = app.worker_row(&name).await;
    let deaths = app
        .count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'worker.dead' AND worker = '{name}'"
        ))
        .await;
    let (_, after) = app.get_json(&format!("/api/rentals/{id}")).await;
    drop(flood);
    assert_eq!(deaths, 0, "the flooded worker was declared dead");
    assert_eq!(
        worker.status,
        orion::model::WorkerStatus::Alive,
        "{worker:?}"
    );
    assert_eq!(after["status"], "active", "{after}");
    assert_eq!(after["worker"], name.as_str(), "the rental moved: {after}");
}

/// A tenant's flood from inside the workers' network: from another worker, connections
/// to this worker's sshd that never say anything, held `for_secs`. Writes `/tmp/flood`
/// on the flooding worker once they are open.
fn flood_from(flooder: &crate::helpers::Worker, target: &str, n: usize, for_secs: u32) {
    let script = format!(
        "import socket, time\n\
         held = []\n\
         for _ in range({n}):\n\
         \x20   try:\n\
         \x20       held.append(socket.create_connection(('{target}', 22), timeout=2))\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         open('/tmp/flood', 'w').write(str(len(held)))\n\
         time.sleep({for_secs})\n"
    );
    crate::helpers::docker(&["exec", "-d", &flooder.container, "python3", "-c", &script]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_from_another_address_on_the_workers_network_leaves_orion_s_logins_through() {
    const FLOOD: usize = 300;
    let app = spawn_app_with(
        2,
        Box::new(|c| c.health.handshake_every = Duration::from_millis(1)),
    )
    .await;
    let (target, flooder) = (app.worker("worker_1"), app.worker("worker_2"));
    flood_from(flooder, &target.address(), FLOOD, 20);
    let opened = Instant::now() + Duration::from_secs(15);
    loop {
        let done = flooder.exec("cat /tmp/flood 2>/dev/null || true");
        if !done.trim().is_empty() {
            println!("{} connections opened by the flood", done.trim());
            break;
        }
        assert!(
            Instant::now() < opened,
            "the flood never opened its connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections from Orion's address still log in: one address cannot fill sshd.
    let row = app.worker_row("worker_1").await;
    for _ in 0..3 {
        let probe = app
            .ctx
            .prober
            .probe(&row.target(), Duration::from_secs(3))
            .await;
        assert!(
            probe
                .as_ref()
                .is_ok_and(|p| p.depth == orion::probe::ProbeDepth::Handshake),
            "Orion could not open a new connection during another address's flood: {probe:?}"
        );
    }
}

/// What a client that said hello got from the gateway.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The worker's banner: forwarded.
    Banner,
    /// Closed this long after it said hello.
    Closed(Duration),
}

/// Says hello on `port` as an SSH client would, and waits (at most `limit`) for an answer.
async fn hello_and_wait(port: u16, limit: Duration) -> Option<Answer> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(b"SSH-2.0-waiter\r\n").await.ok()?;
    let said = Instant::now();
    let mut banner = [0u8; 8];
    match tokio::time::timeout(limit, stream.read_exact(&mut banner)).await {
        Ok(Ok(_)) if &banner == b"SSH-2.0-" => Some(Answer::Banner),
        Ok(_) => Some(Answer::Closed(said.elapsed())),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn waits_through_a_move_are_bounded_per_port_and_overall_the_rest_refused_at_once() {
    const EACH: usize = 10;
    let app = spawn_app_with(
        2,
        Box::new(|c| {
            c.gateway.max_waiting_per_port = 8;
            c.gateway.max_waiting = 12;
            c.gateway.wait = Duration::from_secs(60);
        }),
    )
    .await;
    let (a, b) = (
        app.rent_ok(json!({ "username": "anna" })).await,
        app.rent_ok(json!({ "username": "bert" })).await,
    );
    let ids = [a["id"].as_str().unwrap(), b["id"].as_str().unwrap()];
    let set = |status: &'static str| {
        let pool = app.ctx.store.pool().clone();
        let ids = ids.map(str::to_owned);
        async move {
            sqlx::query("UPDATE rentals SET status = ? WHERE id IN (?, ?)")
                .bind(status)
                .bind(&ids[0])
                .bind(&ids[1])
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Both rentals are moving: every connection to their ports would wait.
    set("migrating").await;
    let mut clients = tokio::task::JoinSet::new();
    for rental in [&a, &b] {
        let port = rental["endpoint"]["port"].as_u64().unwrap() as u16;
        for _ in 0..EACH {
            clients.spawn(hello_and_wait(port, Duration::from_secs(30)));
        }
    }
    // 8 wait on the first port, 4 on the second (12 in all): 8 are refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = counter(&app, "orion_gateway_connections_total", "wait_limit").await;
        if refused.is_some_and(|n| n >= 8.0) {
            assert_eq!(refused, Some(8.0), "more refused than the bounds say");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections beyond the bounds on waits were not refused: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The moves end: the waiting ones are forwarded.
    set("active").await;
    let answers = clients.join_all().await;
    let forwarded = answers
        .iter()
        .filter(|a| **a == Some(Answer::Banner))
        .count();
    let at_once = answers
        .iter()
        .filter(|a| matches!(a, Some(Answer::Closed(t)) if *t < Duration::from_secs(1)))
        .count();
    assert_eq!((forwarded, at_once), (12, 8), "{answers:?}");
}
