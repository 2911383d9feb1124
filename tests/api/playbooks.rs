use orion::playbook::{Playbook, Vars};

use crate::helpers::{spawn_app, tenant_key};

/// What an account looks like on a worker: passwd entry, home mode, key, shadow hash.
fn account_state(worker: &crate::helpers::Worker, user: &str) -> String {
    worker.exec(&format!(
        "getent passwd {user}; stat -c '%a %U' /home/{user}; \
         cat /etc/orion/keys/{user} 2>/dev/null; getent shadow {user} | cut -d: -f2"
    ))
}

#[tokio::test]
async fn each_playbook_runs_twice_with_the_same_result() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    let target = app.worker_row("worker_1").await.target();
    let (_, public) = tenant_key();
    let vars = Vars {
        username: "frank".into(),
        uid: Some(200_001),
        public_key: Some(public.clone()),
        password_hash: Some(orion::model::hash_password("s3cret-pass")),
    };

    app.ctx
        .executor
        .run(Playbook::CreateUser, &vars, &target)
        .await
        .unwrap();
    let first = account_state(worker, "frank");
    app.ctx
        .executor
        .run(Playbook::CreateUser, &vars, &target)
        .await
        .unwrap();
    let second = account_state(worker, "frank");
    assert_eq!(first, second);
    assert!(first.contains("/home/frank:/bin/bash"), "{first}");
    assert!(first.contains("700 frank"), "home must be private: {first}");
    assert!(first.contains(&public), "{first}");
    assert!(first.contains("$6$"), "{first}");

    app.ctx
        .executor
        .run(Playbook::DeleteUser, &vars, &target)
        .await
        .unwrap();
    assert!(!worker.has_user("frank"));
    app.ctx
        .executor
        .run(Playbook::DeleteUser, &vars, &target)
        .await
        .unwrap();
    assert!(!worker.has_user("frank"));
    assert_eq!(worker.exec("ls -d /home/frank 2>/dev/null | wc -l"), "0");
}

#[tokio::test]
async fn no_secret_reaches_the_workers_command_lines() {
    let app = spawn_app(1).await;
    let worker = app.worker("worker_1");
    let target = app.worker_row("worker_1").await.target();
    let hash = orion::model::hash_password("another-secret");
    let vars = Vars {
        username: "grace".into(),
        uid: Some(200_002),
        public_key: None,
        password_hash: Some(hash.clone()),
    };
    // Record every command line that runs while the playbook does.
    worker.exec("rm -f /tmp/cmdlines; (for i in $(seq 1 400); do cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' >> /tmp/cmdlines; echo >> /tmp/cmdlines; sleep 0.005; done) >/dev/null 2>&1 &");
    for _ in 0..5 {
        app.ctx
            .executor
            .run(Playbook::CreateUser, &vars, &target)
            .await
            .unwrap();
    }
    let seen = worker.exec("cat /tmp/cmdlines");
    assert!(
        seen.contains("sh -s"),
        "the recorder saw the playbook run: {}",
        seen.len()
    );
    let salt_and_hash = hash.rsplit('$').next().unwrap();
    assert!(
        !seen.contains(salt_and_hash),
        "the password hash appeared in a command line"
    );
}
