//! The Ansible executor beside the native one: same account either way, clear errors.

use std::path::PathBuf;
use std::time::Duration;

use orion::config::ExecutorKind;
use orion::playbook::{Ansible, Executor, Playbook, Vars};
use orion::ssh::Auth;
use serde_json::{Value, json};

use crate::helpers::{TestApp, Worker, spawn_app, spawn_app_with, tenant_key};

fn require_ansible() {
    let found = std::process::Command::new("ansible-playbook")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "ansible-playbook is missing: these tests need ansible-core (scripts/test.sh installs it)"
    );
}

fn ansible_executor(app: &TestApp) -> Executor {
    app.ctx.executor.clone().with_ansible(Ansible {
        program: PathBuf::from("ansible-playbook"),
        playbooks: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("playbooks"),
        key: app.key.path.clone(),
        user: "root".into(),
        timeout: Duration::from_secs(120),
    })
}

/// What a user can observe of an account: passwd entry, home owner and mode, key, hash.
fn account_state(worker: &Worker, user: &str) -> String {
    worker.exec(&format!(
        "getent passwd {user}; id -nG {user}; stat -c '%a %U %G' /home/{user} \
         /etc/orion/keys/{user}; cat /etc/orion/keys/{user} 2>/dev/null; \
         getent shadow {user} | cut -d: -f2; chage -l {user} | grep 'Account expires'"
    ))
}

#[tokio::test]
async fn both_executors_make_the_same_account_idempotently_and_remove_it() {
    require_ansible();
    let app = spawn_app(2).await;
    let native = app.ctx.executor.clone();
    let ansible = ansible_executor(&app);
    let (key, public) = tenant_key();
    let vars = Vars {
        username: "rita".into(),
        uid: Some(200_003),
        public_key: Some(public),
        password_hash: Some(orion::model::hash_password("rita-pass-123")),
    };
    let mut states = Vec::new();
    for (executor, name) in [(&native, "worker_1"), (&ansible, "worker_2")] {
        let target = app.worker_row(name).await.target();
        executor
            .run(Playbook::CreateUser, &vars, &target)
            .await
            .unwrap();
        let first = account_state(app.worker(name), "rita");
        executor
            .run(Playbook::CreateUser, &vars, &target)
            .await
            .unwrap();
        assert_eq!(
            first,
            account_state(app.worker(name), "rita"),
            "{name}: not idempotent"
        );
        let port = app.worker(name).port;
        for auth in [
            Auth::Key(key.clone()),
            Auth::Password("rita-pass-123".into()),
        ] {
            let who = app.tenant_whoami("127.0.0.1", port, "rita", auth).await;
            assert_eq!(who.as_deref(), Ok("rita"), "{name}");
        }
        states.push(first);
    }
    assert_eq!(states[0], states[1], "native and Ansible accounts differ");
    assert!(states[0].contains("700 rita rita"), "{}", states[0]);

    for (executor, name) in [(&native, "worker_1"), (&ansible, "worker_2")] {
        let target = app.worker_row(name).await.target();
        executor
            .run(Playbook::DeleteUser, &vars, &target)
            .await
            .unwrap();
        executor
            .run(Playbook::DeleteUser, &vars, &target)
            .await
            .unwrap();
        assert!(!app.worker(name).has_user("rita"), "{name}");
        assert_eq!(
            app.worker(name)
                .exec("ls -d /home/rita 2>/dev/null | wc -l"),
            "0"
        );
    }
}

#[tokio::test]
async fn renting_and_releasing_with_the_ansible_executor() {
    require_ansible();
    let app = spawn_app_with(
        1,
        Box::new(|c| c.provisioning.executor = ExecutorKind::Ansible),
    )
    .await;
    let (key, public) = tenant_key();
    let resp = app
        .rent(json!({ "ssh_public_key": public, "username": "sam" }))
        .await;
    assert_eq!(resp.status(), 201);
    let rental: Value = resp.json().await.unwrap();
    let port = rental["port"].as_u64().unwrap() as u16;
    let who = app
        .tenant_whoami("127.0.0.1", port, "sam", Auth::Key(key))
        .await;
    assert_eq!(who.as_deref(), Ok("sam"));
    let id = rental["id"].as_str().unwrap();
    assert_eq!(app.release(id).await, 204);
    assert!(!app.worker("worker_1").has_user("sam"));
}

async fn failed_rent_reason(app: &TestApp) -> String {
    let resp = app.rent(json!({ "username": "tina" })).await;
    assert_eq!(resp.status(), 502);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "provisioning_failed");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM workers WHERE rental_id IS NOT NULL")
            .await,
        0,
        "the worker is not left allocated"
    );
    sqlx::query_scalar("SELECT message FROM events WHERE kind = 'rental.failed'")
        .fetch_one(app.ctx.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_missing_ansible_playbook_program_fails_the_rent_saying_so() {
    let app = spawn_app_with(
        1,
        Box::new(|c| {
            c.provisioning.executor = ExecutorKind::Ansible;
            c.provisioning.ansible_playbook = "/nonexistent/ansible-playbook".into();
        }),
    )
    .await;
    let reason = failed_rent_reason(&app).await;
    assert!(
        reason.contains("create_user.yml") && reason.contains("not found"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_failing_ansible_playbook_fails_the_rent_with_its_reason_and_no_secret() {
    require_ansible();
    let app = spawn_app_with(
        1,
        Box::new(|c| c.provisioning.executor = ExecutorKind::Ansible),
    )
    .await;
    app.worker("worker_1").exec("chmod 000 /usr/sbin/useradd");
    let reason = failed_rent_reason(&app).await;
    assert!(
        reason.contains("create_user.yml") && reason.contains("fatal"),
        "{reason}"
    );
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM rentals")
        .fetch_one(app.ctx.store.pool())
        .await
        .unwrap();
    let salt_and_hash = hash.rsplit('$').next().unwrap();
    assert!(
        !reason.contains(salt_and_hash),
        "the password hash leaked: {reason}"
    );
}

#[tokio::test]
async fn an_ansible_run_that_failed_half_way_is_undone() {
    require_ansible();
    let app = spawn_app_with(
        1,
        Box::new(|c| c.provisioning.executor = ExecutorKind::Ansible),
    )
    .await;
    let worker = app.worker("worker_1");
    // The account is made, then writing its key fails: the run changed the worker.
    worker.exec("mkdir -p /etc/orion/keys/uma/blocked");
    let (_, public) = tenant_key();
    let resp = app
        .rent(json!({ "ssh_public_key": public, "username": "uma" }))
        .await;
    assert_eq!(resp.status(), 502, "{}", resp.text().await.unwrap());
    assert!(
        !worker.has_user("uma"),
        "the half-made account was left behind"
    );
    assert!(!app.worker_row("worker_1").await.allocated());
}

#[tokio::test]
async fn both_executors_install_the_host_certificate_idempotently_and_refuse_a_foreign_key() {
    require_ansible();
    let app = spawn_app(2).await;
    let ca = orion::hostca::HostCa::from_key(orion::ssh::generate_ed25519());
    let native = app.ctx.executor.clone();
    let ansible = ansible_executor(&app);
    for (executor, name) in [(&native, "worker_1"), (&ansible, "worker_2")] {
        let row = app.worker_row(name).await;
        let host_key = row
            .known_host_key
            .clone()
            .expect("probed: its key is trusted");
        let key = orion::ssh::parse_host_key(&host_key).unwrap();
        let cert = ca
            .sign(&key, name, &["localhost".into()], Duration::from_secs(3600))
            .unwrap();
        let vars = orion::playbook::CertVars {
            certificate: cert.line.clone(),
            host_key: host_key.clone(),
        };
        let target = row.target();
        for _ in 0..2 {
            executor.run_cert(&vars, &target).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let worker = app.worker(name);
        assert_eq!(
            worker
                .exec("cat /etc/ssh/ssh_host_ed25519_key-cert.pub")
                .trim(),
            cert.line,
            "{name}"
        );
        // sshd presents it: a client asking for certificates gets this one.
        let scan = std::process::Command::new("ssh-keyscan")
            .args([
                "-c",
                "-t",
                "ed25519",
                "-p",
                &worker.port.to_string(),
                "127.0.0.1",
            ])
            .output()
            .expect("ssh-keyscan runs");
        let scanned = String::from_utf8_lossy(&scan.stdout);
        let body = cert.line.split_whitespace().nth(1).unwrap();
        assert!(
            scanned.contains(body),
            "{name} does not present it: {scanned}"
        );

        // A certificate for a key the worker does not hold is refused, changing nothing.
        let other = orion::ssh::generate_ed25519();
        let foreign = orion::playbook::CertVars {
            certificate: ca
                .sign(
                    other.public_key(),
                    name,
                    &["localhost".into()],
                    Duration::from_secs(3600),
                )
                .unwrap()
                .line,
            host_key: orion::ssh::host_key_line(other.public_key()),
        };
        let refused = executor.run_cert(&foreign, &target).await.unwrap_err();
        assert!(
            refused.to_string().contains("not the one Orion trusts"),
            "{name}: {refused}"
        );
        assert_eq!(
            worker
                .exec("cat /etc/ssh/ssh_host_ed25519_key-cert.pub")
                .trim(),
            cert.line
        );
    }
}
