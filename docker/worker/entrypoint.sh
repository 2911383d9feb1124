#!/bin/bash
# Orion worker entrypoint: prepare sshd state, install Orion's key, run sshd
# in the foreground as PID 1 (it reaps children and handles SIGTERM/SIGHUP).
set -euo pipefail

die() { echo "orion-worker: ERROR: $*" >&2; exit 1; }

# Privilege-separation dir; /run is fresh on every container start.
mkdir -p /run/sshd
chmod 0755 /run/sshd

# Apps: the host's engine socket is bind-mounted at
# /var/lib/orion/runtime/docker.sock and is root's alone. Its directories are
# what keeps tenants out (the socket's own mode is the host's: never chmod or
# chown the socket itself), so re-assert them at every start.
chown root:root /var/lib/orion /var/lib/orion/runtime
chmod 0700 /var/lib/orion /var/lib/orion/runtime
[[ -S /var/lib/orion/runtime/docker.sock ]] \
  || echo "orion-worker: no container runtime socket at /var/lib/orion/runtime/docker.sock: apps cannot run here" >&2

# Host keys live in the container's writable layer: generate the key only if
# missing, so `docker stop`/`docker start` keeps the worker's identity. One
# ed25519 key, the only host key sshd_config offers: no NIST curve, no RSA
# (whose keygen would also cost 0.4-1.5 s of CPU per worker start).
f=/etc/ssh/ssh_host_ed25519_key
if [[ ! -s "$f" ]]; then
  rm -f "$f" "$f.pub"   # ssh-keygen would prompt before overwriting
  ssh-keygen -q -t ed25519 -N '' -f "$f" </dev/null || die "cannot generate the ed25519 host key"
fi

# Orion's public key: env ORION_AUTHORIZED_KEY (one key line) and/or a mounted
# file /etc/orion/authorized_keys. Keys are appended if missing, never
# replaced, so keys added later at runtime survive restarts.
keys=""
if [[ -n "${ORION_AUTHORIZED_KEY:-}" ]]; then
  keys+="${ORION_AUTHORIZED_KEY}"$'\n'
fi
if [[ -s /etc/orion/authorized_keys ]]; then
  keys+="$(cat /etc/orion/authorized_keys)"$'\n'
fi
[[ -n "${keys//[[:space:]]/}" ]] || die "no SSH key for root: set ORION_AUTHORIZED_KEY='ssh-ed25519 AAAA... orion' or mount a file at /etc/orion/authorized_keys"

install -d -m 700 -o root -g root /root/.ssh
touch /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
while IFS= read -r line; do
  line="${line%$'\r'}"
  [[ -n "${line//[[:space:]]/}" && "$line" != \#* ]] || continue
  ssh-keygen -l -f /dev/stdin <<<"$line" >/dev/null 2>&1 || die "not a valid SSH public key: ${line:0:60}"
  grep -qxF -- "$line" /root/.ssh/authorized_keys || printf '%s\n' "$line" >> /root/.ssh/authorized_keys
done <<<"$keys"

# Fail here with sshd's own message rather than in a restart loop.
/usr/sbin/sshd -t

unset ORION_AUTHORIZED_KEY
# -D: foreground, -e: log to stderr (docker logs). Absolute path so SIGHUP
# re-exec (config/host key reload) works.
exec /usr/sbin/sshd -D -e "$@"
