//! Bodies over the API's limit (64 KiB), sent by the clients that exist: curl with and
//! without `Expect: 100-continue`, over HTTP/1.1 and HTTP/2; Python's urllib, which
//! writes the whole body before it reads anything; a raw TLS writer that does the same
//! and then asks again on the same connection. Each gets status 413 and Orion's JSON
//! error, through the platform's own Caddy (the real `caddy/Caddyfile`) in front of a
//! real Orion, at 200 KiB and at 8 MiB, with a Content-Length and chunked.
//!
//! A proxy that answers before it has read the body and then closes leaves such a
//! client writing into a reset connection: it never reads the answer.
//!
//! Past Orion's bound (16 MiB) closing the client's connection is accepted, but a body
//! that long must not make Caddy take Orion for failed (and refuse everyone for its
//! `fail_duration`), as a body Caddy cut off under its copy to Orion did.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use orion::testkit::{ADMIN_TOKEN, docker, free_port};
use serde_json::Value;

use crate::helpers::spawn_app;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Sizes over the limit: under Go's own discard threshold (256 KiB), and far over it.
const SIZES: [usize; 2] = [200 * KIB, 8 * MIB];

/// The platform's Caddy (image `orion/caddy`, the repository's `caddy/Caddyfile`) on the
/// host's network, so that it reaches the test's Orion on loopback, listening on free
/// ports of its own. Removed when dropped.
struct Edge {
    container: String,
    port: u16,
    _admin: tempfile::TempDir,
}

impl Edge {
    fn start(orion_port: u16) -> Self {
        let caddyfile = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("caddy/Caddyfile");
        // The admin socket's directory must exist; nothing here uses it.
        let admin = tempfile::tempdir().unwrap();
        let port = free_port();
        let http_port = free_port();
        let container = format!("orion-test-edge-{port}");
        docker(&[
            "run",
            "-d",
            "--name",
            &container,
            "--label",
            "orion.test=1",
            "--network",
            "host",
            "-e",
            &format!("ORION_API_UPSTREAMS=127.0.0.1:{orion_port}"),
            "-e",
            "ORION_SITE=localhost",
            "-e",
            &format!("CADDY_HTTPS_PORT={port}"),
            "-e",
            &format!("CADDY_HTTP_PORT={http_port}"),
            "-v",
            &format!("{}:/etc/caddy/Caddyfile:ro", caddyfile.display()),
            "-v",
            &format!("{}:/run/caddy-admin", admin.path().display()),
            "orion/caddy:latest",
        ]);
        Self {
            container,
            port,
            _admin: admin,
        }
    }

    /// The status of one `GET /health` through Caddy (`None`: no answer in 10 s). Caddy
    /// holds a request up to 3 s for an Orion it took for failed, then answers 503. Sent
    /// from 127.0.0.2: its turns of Orion's rate limit for requests without a token are
    /// not those of Caddy's own health checks (from 127.0.0.1), which must not get 429.
    async fn health(&self) -> Option<u16> {
        let http = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
            // Caddy's internal CA: the TLS itself is the platform test's to check.
            .danger_accept_invalid_certs(true)
            .resolve(
                "localhost",
                std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("https://localhost:{}/health", self.port);
        let resp = http.get(&url).send().await.ok()?;
        Some(resp.status().as_u16())
    }

    /// Waits until Orion's health answers through Caddy (its certificate issued, its
    /// health check of Orion passed).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.health().await != Some(200) {
            assert!(
                Instant::now() < deadline,
                "Orion's health never answered through Caddy: {}",
                docker(&["logs", "--tail", "20", &self.container])
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
    }
}

/// What a client got: the status and body of its answer, or what went wrong instead.
struct Outcome {
    status: Option<u16>,
    body: String,
    error: Option<String>,
    /// The status of a second request on the same connection (raw writer only).
    after: Option<u16>,
}

impl Outcome {
    /// What is wrong with this outcome of `client`: anything but status 413 with Orion's
    /// JSON error (and, when `same_connection`, a second request answered on the same
    /// connection).
    fn wrong(&self, client: &str, same_connection: bool) -> Option<String> {
        let json: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        let refused = self.status == Some(413) && json["error"]["code"] == "too_large";
        let kept = !same_connection || self.after == Some(200);
        (!refused || !kept).then(|| {
            format!(
                "{client}: status {:?}, body {:?}, error {:?}, then {:?}",
                self.status, self.body, self.error, self.after
            )
        })
    }
}

/// Panics listing every wrong outcome, if any.
fn assert_all_413(wrong: &[String]) {
    assert!(
        wrong.is_empty(),
        "{} clients did not get their 413 (with a too_large JSON error, and the connection \
         kept for the raw writer):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// A Python client (urllib, or a raw socket) that writes the whole request before it
/// reads anything. Prints one JSON line: status, body, error, after.
const PYTHON_CLIENT: &str = r#"
import json, os, socket, ssl, sys, urllib.error, urllib.request
scheme, port, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
token = os.environ["ORION_TOKEN"]
body = b'{"junk":"' + b"a" * (size - 11) + b'"}'
def chunks():
    for i in range(0, size, 65536):
        yield body[i:i + 65536]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out = {"status": None, "body": "", "error": None, "after": None}
headers = {"Content-Type": "application/json", "Authorization": "Bearer " + token}

def read_response(f):
    status = int(f.readline().split()[1])
    length, chunked = None, False
    while True:
        line = f.readline().strip()
        if not line:
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        if name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        data = b""
        while True:
            n = int(f.readline().strip().split(b";")[0], 16)
            data += f.read(n)
            f.readline()
            if n == 0:
                return status, data.decode()
    return status, f.read(length or 0).decode()

try:
    if mode.startswith("urllib"):
        if mode == "urllib-chunked":
            headers["Transfer-Encoding"] = "chunked"
            data = chunks()
        else:
            data = body
        req = urllib.request.Request(
            f"{scheme}://localhost:{port}/api/rent", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
                out["status"], out["body"] = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            out["status"], out["body"] = e.code, e.read().decode()
    else:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        if scheme == "https":
            s = ctx.wrap_socket(s, server_hostname="localhost")
        head = "POST /api/rent HTTP/1.1\r\nHost: localhost\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items())
        if mode == "raw-chunked":
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks()) + b"0\r\n\r\n"
            head += "Transfer-Encoding: chunked\r\n\r\n"
        else:
            payload = body
            head += f"Content-Length: {size}\r\n\r\n"
        # All of it, before reading anything.
        s.sendall(head.encode() + payload)
        f = s.makefile("rb")
        out["status"], out["body"] = read_response(f)
        # The body was read to its end: the connection is still good for another request.
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        out["after"], _ = read_response(f)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"#;

/// Runs [`PYTHON_CLIENT`] in `mode` (`urllib`, `urllib-chunked`, `raw`, `raw-chunked`).
fn python(scheme: &str, port: u16, size: usize, mode: &str) -> Outcome {
    let out = Command::new("python3")
        .args(["-c", PYTHON_CLIENT, scheme, &port.to_string()])
        .args([&size.to_string(), mode])
        .env("ORION_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("python3 runs");
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
        panic!(
            "python client {mode} printed {line:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Outcome {
        status: v["status"].as_u64().map(|s| s as u16),
        body: v["body"].as_str().unwrap_or_default().to_owned(),
        error: v["error"].as_str().map(str::to_owned),
        after: v["after"].as_u64().map(|s| s as u16),
    }
}

/// `curl` posting the file `body` to Caddy's `/api/rent` with `flags`.
fn curl(dir: &Path, port: u16, body: &Path, flags: &[&str]) -> Outcome {
    let answer = dir.join("answer");
    let _ = std::fs::remove_file(&answer);
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/api/rent");
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "60", "--resolve", &resolve])
        .args(["-o", answer.to_str().unwrap(), "-w", "%{http_code}"])
        .args(["-H", "Content-Type: application/json"])
        // The token from a file: never on a command line.
        .arg("-H")
        .arg(format!("@{}", dir.join("auth").display()))
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .args(flags)
        .arg(&url)
        .output()
        .expect("curl runs");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Outcome {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().ok(),
        body: std::fs::read_to_string(&answer).unwrap_or_default(),
        error: (!out.status.success() || !stderr.is_empty())
            .then(|| format!("{}: {stderr}", out.status)),
        after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_its_413_through_the_platforms_caddy_from_every_kind_of_client()
{
    let app = spawn_app(0).await;
    let orion_port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let edge = Edge::start(orion_port);
    edge.wait_ready().await;
    let port = edge.port;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("auth"),
        format!("Authorization: Bearer {ADMIN_TOKEN}\n"),
    )
    .unwrap();
    let started = Instant::now();
    let mut wrong = Vec::new();
    for size in SIZES {
        let body = dir.path().join(format!("body-{size}"));
        std::fs::write(&body, vec![b'a'; size]).unwrap();
        // Each twice: a race between an early answer and the client's writes loses only
        // sometimes.
        for _ in 0..2 {
            for flags in [
                &["--http1.1", "-H", "Expect: 100-continue"][..],
                &["--http1.1", "-H", "Expect:"],
                &["--http1.1", "-H", "Transfer-Encoding: chunked"],
                &[
                    "--http1.1",
                    "-H",
                    "Transfer-Encoding: chunked",
                    "-H",
                    "Expect:",
                ],
                &["--http2"],
                &["--http2", "-H", "Transfer-Encoding: chunked"],
            ] {
                let outcome = curl(dir.path(), port, &body, flags);
                wrong.extend(outcome.wrong(&format!("curl {flags:?}, {size} bytes"), false));
            }
            for mode in ["urllib", "urllib-chunked", "raw", "raw-chunked"] {
                let outcome = python("https", port, size, mode);
                let raw = mode.starts_with("raw");
                wrong.extend(outcome.wrong(&format!("python {mode}, {size} bytes"), raw));
            }
        }
    }
    eprintln!(
        "{} requests through Caddy in {:?}",
        2 * 10 * SIZES.len(),
        started.elapsed()
    );

    // Past the bound Orion drains (16 MiB), a client that waits for `100 Continue` is
    // refused before it sends anything.
    let huge = dir.path().join("huge");
    std::fs::write(&huge, vec![b'a'; 17 * MIB]).unwrap();
    let outcome = curl(
        dir.path(),
        port,
        &huge,
        &["--http1.1", "-H", "Expect: 100-continue"],
    );
    wrong.extend(outcome.wrong("curl with Expect, 17 MiB", false));
    assert_all_413(&wrong);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orion_reads_a_body_over_the_limit_to_its_end_before_it_answers_413() {
    let app = spawn_app(0).await;
    let port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let mut wrong = Vec::new();
    for size in SIZES {
        for mode in ["urllib", "urllib-chunked", "raw", "raw-chunked"] {
            let outcome = python("http", port, size, mode);
            let raw = mode.starts_with("raw");
            wrong.extend(outcome.wrong(&format!("{mode}, {size} bytes, to Orion"), raw));
        }
    }
    assert_all_413(&wrong);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_past_the_bound_leaves_orion_in_service_behind_caddy() {
    let app = spawn_app(0).await;
    let orion_port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let edge = Edge::start(orion_port);
    edge.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("auth"),
        format!("Authorization: Bearer {ADMIN_TOKEN}\n"),
    )
    .unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b'a'; 40 * MIB]).unwrap();
    // Past the bound the client's connection may be closed under it (what it gets is
    // not checked); Orion must still be taken for alive by Caddy, at once.
    let mut wrong = Vec::new();
    for flags in [
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect:",
        ][..],
        &["--http2", "-H", "Transfer-Encoding: chunked"],
    ] {
        curl(dir.path(), edge.port, &body, flags);
        let health = edge.health().await;
        if health != Some(200) {
            wrong.push(format!("after curl {flags:?}: health {health:?}"));
        }
        edge.wait_ready().await;
    }
    python("https", edge.port, 40 * MIB, "raw-chunked");
    let health = edge.health().await;
    if health != Some(200) {
        wrong.push(format!("after a raw chunked writer: health {health:?}"));
    }
    assert!(
        wrong.is_empty(),
        "a 40 MiB chunked body got Orion taken for failed: {wrong:?}"
    );
}
