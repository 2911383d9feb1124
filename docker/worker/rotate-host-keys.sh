#!/bin/bash
# Replace this worker's SSH host keys and make the running sshd use them,
# without dropping existing sessions. New keys are generated aside and then
# renamed into place, so there is no moment with no host keys on disk.
# Prints the new public keys (for Orion's known_hosts) on stdout.
# Usage: orion-rotate-host-keys [type...]   (default: ed25519, the only type
#        sshd_config offers)
set -euo pipefail

types=("$@")
((${#types[@]})) || types=(ed25519)

tmp="$(mktemp -d /etc/ssh/.rotate.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
for t in "${types[@]}"; do
  ssh-keygen -q -t "$t" -N '' -C "root@$(hostname)" -f "$tmp/ssh_host_${t}_key"
done
for t in "${types[@]}"; do
  mv -f "$tmp/ssh_host_${t}_key" "/etc/ssh/ssh_host_${t}_key"
  mv -f "$tmp/ssh_host_${t}_key.pub" "/etc/ssh/ssh_host_${t}_key.pub"
done

# SIGHUP makes the sshd listener re-exec itself and reload its host keys;
# established sessions are separate processes and are not affected.
kill -HUP "$(cat /run/sshd.pid 2>/dev/null || echo 1)"
for t in "${types[@]}"; do cat "/etc/ssh/ssh_host_${t}_key.pub"; done
