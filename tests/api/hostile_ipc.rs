//! A released tenant leaves nothing in the worker's kernel: System V shared memory,
//! semaphores and message queues, POSIX message queues and shared memory, all of its
//! uid, are gone with its account, whichever executor removes it.

use orion::config::ExecutorKind;
use serde_json::json;

use crate::helpers::{Worker, spawn_app_with, tenant_key};
use crate::isolation::as_tenant;

/// What the tenant leaves behind: an 8 MiB System V segment (charged to the worker's
/// memory, not to any process), a semaphore set, a message queue, one of each handed to
/// root (an owner may give an object away; its creator stays), a POSIX message queue
/// and a POSIX shared memory file.
const LEAVE_IPC: &str = r#"set -e
ipcmk -M 8388608 >/dev/null
ipcmk -S 1 >/dev/null
ipcmk -Q >/dev/null
head -c 65536 /dev/zero > /dev/shm/orion-left
python3 - <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.mq_open(b"/orion-left", os.O_CREAT | os.O_RDWR, 0o600, None)
if fd < 0:
    sys.exit("mq_open: errno %d" % ctypes.get_errno())
# A segment given away to root: shmctl(IPC_SET) by its owner, uid field only.
IPC_PRIVATE, IPC_CREAT, IPC_STAT, IPC_SET = 0, 0o1000, 2, 1
libc.shmget.restype = ctypes.c_int
shmid = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
buf = ctypes.create_string_buffer(256)
if shmid < 0 or libc.shmctl(shmid, IPC_STAT, buf) != 0:
    sys.exit("shmget/shmctl: errno %d" % ctypes.get_errno())
# struct ipc_perm starts with key (int), then uid (u32): set uid to 0.
ctypes.memmove(ctypes.addressof(buf) + 4, (ctypes.c_uint32 * 1)(0), 4)
if libc.shmctl(shmid, IPC_SET, buf) != 0:
    sys.exit("shmctl IPC_SET: errno %d" % ctypes.get_errno())
PY
echo left"#;

/// Every IPC object of `uid` on the worker, as root sees it: one line per object.
fn ipc_of(worker: &Worker, uid: &str) -> String {
    worker.exec(&format!(
        "for t in shm sem msg; do awk -v u={uid} -v t=$t \
           'NR == 1 {{ for (i = 1; i <= NF; i++) c[$i] = i; next }} \
            $c[\"uid\"] == u || $c[\"cuid\"] == u {{ print \"sysv \" t \" \" $2 \" owner \" $c[\"uid\"] }}' \
           /proc/sysvipc/$t; done; \
         find /dev/mqueue /dev/shm -xdev -uid {uid} -printf 'posix %p\\n'"
    ))
}

async fn a_released_tenant_leaves_no_ipc_object(executor: ExecutorKind) {
    let app = spawn_app_with(1, Box::new(move |c| c.provisioning.executor = executor)).await;
    let worker = app.worker("worker_1");
    let (key, public) = tenant_key();
    let rental = app
        .rent_ok(json!({ "ssh_public_key": public, "username": "ipcer" }))
        .await;
    let port = rental["port"].as_u64().unwrap() as u16;
    let uid = worker.exec("id -u ipcer");

    assert_eq!(
        as_tenant(&app, port, "ipcer", &key, LEAVE_IPC).await,
        "left"
    );
    let before = ipc_of(worker, &uid);
    for what in [
        "sysv shm",
        "sysv sem",
        "sysv msg",
        "owner 0",
        "/dev/mqueue/orion-left",
    ] {
        assert!(before.contains(what), "the tenant made no {what}: {before}");
    }
    assert!(
        worker.exec("ipcs -m -c").contains("ipcer"),
        "ipcs shows the tenant's segments"
    );

    assert_eq!(app.release(rental["id"].as_str().unwrap()).await, 204);
    assert!(!worker.has_user("ipcer"));
    let after = ipc_of(worker, &uid);
    assert!(
        after.is_empty(),
        "the released uid {uid} keeps IPC objects on the worker ({executor:?}):\n{after}"
    );
}

#[tokio::test]
async fn a_released_tenant_leaves_no_ipc_object_with_the_native_executor() {
    a_released_tenant_leaves_no_ipc_object(ExecutorKind::Native).await;
}

#[tokio::test]
async fn a_released_tenant_leaves_no_ipc_object_with_the_ansible_executor() {
    a_released_tenant_leaves_no_ipc_object(ExecutorKind::Ansible).await;
}
