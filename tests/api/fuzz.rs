//! Thousands of generated hostile requests against the running API: malformed JSON, huge
//! strings, control characters, shell metacharacters, wrong types, wrong methods. The API
//! must answer each with a 4xx (or a 503/201 when it is valid), never another 5xx, and
//! nothing invalid may reach a worker.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::helpers::spawn_app;

const REQUESTS: usize = 3000;

const NASTY: &[&str] = &[
    "",
    " ",
    "root",
    "a;id",
    "$(reboot)",
    "`id`",
    "a|b",
    "a&&b",
    "a\nb",
    "a\rb",
    "a\0b",
    "../../etc/passwd",
    "'",
    "\"",
    "\\",
    "%s%n",
    "ä",
    "🦀",
    "-rf",
    "--help",
    "a b",
    "ssh-ed25519",
    "ssh-ed25519 AAAA",
    "command=\"sh\" ssh-ed25519 AAAA",
    "http://",
    "ftp://x",
    "javascript:alert(1)",
    "http://user:pw@h/",
    "{}",
    "[]",
    "null",
    "true",
];

fn nasty_string(rng: &mut StdRng) -> String {
    match rng.gen_range(0..5) {
        0 => NASTY[rng.gen_range(0..NASTY.len())].to_owned(),
        1 => "x".repeat(rng.gen_range(30..100_000)),
        2 => (0..rng.gen_range(1..40))
            .map(|_| char::from(rng.gen_range(0u8..128)))
            .collect(),
        3 => format!(
            "{}{}",
            NASTY[rng.gen_range(0..NASTY.len())],
            rng.r#gen::<u32>()
        ),
        _ => (0..rng.gen_range(1..20))
            .map(|_| char::from_u32(rng.gen_range(0..0x2FFFF)).unwrap_or('?'))
            .collect(),
    }
}

fn nasty_value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..6) {
        0 => json!(nasty_string(rng)),
        1 => json!(rng.r#gen::<i64>()),
        2 => json!(rng.r#gen::<bool>()),
        3 => Value::Null,
        4 => json!([nasty_string(rng)]),
        _ => json!({ "k": nasty_string(rng) }),
    }
}

fn nasty_body(rng: &mut StdRng) -> Vec<u8> {
    let fields = [
        "username",
        "ssh_public_key",
        "notify_url",
        "tenant",
        "colour",
        "worker",
    ];
    match rng.gen_range(0..5) {
        0 => {
            let mut obj = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                let f = fields[rng.gen_range(0..fields.len())];
                obj.insert(f.to_owned(), nasty_value(rng));
            }
            serde_json::to_vec(&obj).unwrap()
        }
        1 => nasty_string(rng).into_bytes(),
        2 => {
            let mut v = serde_json::to_vec(&json!({ "username": nasty_string(rng) })).unwrap();
            let cut = rng.gen_range(0..v.len());
            v.truncate(cut);
            v
        }
        3 => (0..rng.gen_range(0..300))
            .map(|_| rng.r#gen::<u8>())
            .collect(),
        _ => serde_json::to_vec(&nasty_value(rng)).unwrap(),
    }
}

#[tokio::test]
async fn thousands_of_hostile_requests_get_4xx_and_reach_no_worker() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    let accounts_before = worker.exec("getent passwd | wc -l");
    let mut rng = StdRng::seed_from_u64(0x0410_2026);
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let paths = [
        "/api/rent",
        "/api/rentals",
        "/api/workers",
        "/api/tokens",
        "/api/nope",
        "/health",
    ];

    let mut requests = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let method = methods[rng.gen_range(0..methods.len())];
        let path = match rng.gen_range(0..4) {
            0 => format!("/api/rentals/{}", urlencode(&nasty_string(&mut rng))),
            1 => format!("/api/tokens/{}", urlencode(&nasty_string(&mut rng))),
            _ => paths[rng.gen_range(0..paths.len())].to_owned(),
        };
        // Most requests are well-formed POST /api/rent with hostile fields.
        let (method, path) = if rng.gen_bool(0.5) {
            ("POST", "/api/rent".to_owned())
        } else {
            (method, path)
        };
        requests.push((method, path, nasty_body(&mut rng)));
    }

    let mut created = 0;
    for chunk in requests.chunks(32) {
        let sent = chunk.iter().map(|(method, path, body)| {
            app.http
                .request(method.parse().unwrap(), app.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        });
        for (resp, (method, path, body)) in
            futures::future::join_all(sent).await.into_iter().zip(chunk)
        {
            let resp = resp.expect("the server answers every request");
            let status = resp.status().as_u16();
            let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            assert!(
                status < 500 || status == 503,
                "{method} {path} {shown:?} -> {status}"
            );
            if status >= 400 && status != 405 {
                let err: Value = resp
                    .json()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e})"));
                assert!(err["error"]["code"].is_string(), "{err}");
            } else if status == 201 && path == "/api/rent" {
                created += 1;
            }
        }
    }
    // Only valid requests made rentals (at most one: there is one worker), and only those
    // reached the worker.
    assert!(created <= 1);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM rentals WHERE status = 'active'")
            .await,
        created
    );
    let accounts_after: i64 = worker.exec("getent passwd | wc -l").parse().unwrap();
    let before: i64 = accounts_before.parse().unwrap();
    assert_eq!(accounts_after, before + created);
    assert_eq!(worker.exec("ls / | grep -c pwned || true"), "0");
}

fn urlencode(s: &str) -> String {
    s.bytes().take(200).map(|b| format!("%{b:02X}")).collect()
}
