#!/usr/bin/env bash
# Makes sure the Docker engine answers. If it does not and this is root on a machine
# that has dockerd, starts dockerd in the background (logging to /var/log/dockerd.log)
# and waits up to 180 s for it. Exits non-zero, saying why, when there is no engine.
#
#   scripts/docker-engine.sh
set -euo pipefail

die() { echo "docker-engine: ERROR: $*" >&2; exit 1; }

command -v docker >/dev/null || die "the docker client is not installed"
docker info >/dev/null 2>&1 && exit 0

command -v dockerd >/dev/null || die "the Docker engine is not reachable and dockerd is not installed"
[[ "$(id -u)" == 0 ]] || die "the Docker engine is not reachable (start it, or run as root so this script can)"

echo "docker-engine: the engine is not reachable: starting dockerd" >&2
# Not through the init script: in containers and sandboxes it often fails on ulimit.
setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
# A daemon that restores many containers from a previous run can take over a minute.
start=$SECONDS
while ((SECONDS - start < 180)); do
  docker info >/dev/null 2>&1 && { echo "docker-engine: dockerd is up after $((SECONDS - start)) s" >&2; exit 0; }
  sleep 0.5
done
tail -n 20 /var/log/dockerd.log >&2 || true
die "dockerd did not answer within 180 s (its log above)"
