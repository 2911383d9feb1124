#!/usr/bin/env bash
# Orion's data plane: N sshd worker containers on the Docker host.
#
#   scripts/workers.sh up N     start worker_1..worker_N (sshd on host ports 22221..),
#                               with Orion's public key, and write the matching inventory
#   scripts/workers.sh stop     stop them, keeping their identity (host keys) and accounts
#   scripts/workers.sh down     remove them
#   scripts/workers.sh status   list them
#
# Containers are named worker_1… so the failure drill is literally `docker stop worker_1`.
# Env: ORION_PROJECT (default orion): state lives in .platform/$ORION_PROJECT
#      ORION_WORKER_PREFIX (default empty): prefix of container names
#      ORION_WORKER_BASE_PORT (default 22220): worker i listens on base + i
#      ORION_WORKER_PIDS (default 1024): most processes and threads in one worker
#        (docker run --pids-limit), so a tenant's fork bomb stays inside its worker
#      ORION_WORKER_MEMORY (default 512m): most memory of one worker, swap included
#        (--memory and --memory-swap), so a memory hog is OOM-killed inside it.
#        Limits, not reservations: idle workers cost what they use.
#      Every worker also runs with --security-opt no-new-privileges. The limits apply
#      to workers created by `up`; remove and re-create a worker to change them.
#
# Apps: each worker gets the host's Docker socket at /var/lib/orion/runtime/docker.sock
# (root-only inside; only /usr/local/sbin/orion-runtime uses it). App instances then run
# as sibling containers on the host's engine that join the worker's PID and network
# namespaces, so `docker stop worker_1` takes its instances down too. The inventory says,
# per worker:
#   instances_join  the worker's container name: whose namespaces its instances join
#   app_host        the worker container's name: where an instance's port is reached,
#                   by Caddy, on the network `$ORION_PROJECT-apps` that `up` makes and
#                   joins every worker to (Docker's DNS resolves the name there, whatever
#                   address a restarted worker gets)
# Without /var/run/docker.sock on the host, workers start without it and run no apps.
set -euo pipefail
cd "$(dirname "$0")/.."

project=${ORION_PROJECT:-orion}
dir=.platform/$project
# The workers' network for apps: Caddy joins it (docker-compose.yml) to reach instances.
apps_net=$project-apps
prefix=${ORION_WORKER_PREFIX:-}
base=${ORION_WORKER_BASE_PORT:-22220}
image=orion/worker:latest
pids=${ORION_WORKER_PIDS:-1024}
memory=${ORION_WORKER_MEMORY:-512m}

sock=/var/run/docker.sock
sock_in=/var/lib/orion/runtime/docker.sock

log() { echo "workers: $*" >&2; }
die() { echo "workers: ERROR: $*" >&2; exit 1; }

up() {
  local n=${1:-3}
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number (got '$n')"
  [[ "$pids" =~ ^[1-9][0-9]*$ ]] || die "ORION_WORKER_PIDS must be a positive number (got '$pids')"
  [[ "$memory" =~ ^[1-9][0-9]*[kmg]?$ ]] || die "ORION_WORKER_MEMORY must be a size such as 512m or 2g (got '$memory')"
  local pub=$dir/orion_ed25519.pub
  [[ -s "$pub" ]] || die "no Orion public key at $pub: run scripts/platform.sh up (it makes one)"
  docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing: run scripts/images.sh"
  local key; key=$(cat "$pub")
  local runtime=()
  if [[ -S "$sock" ]]; then
    runtime=(-v "$sock:$sock_in")
  else
    log "WARNING: no Docker socket at $sock: apps cannot run on these workers"
  fi
  if ! docker network inspect "$apps_net" >/dev/null 2>&1; then
    log "creating the apps network $apps_net"
    docker network create --label "orion.platform=$project" "$apps_net" >/dev/null
  fi
  for ((i = 1; i <= n; i++)); do
    local name="${prefix}worker_$i" port=$((base + i))
    if docker container inspect "$name" >/dev/null 2>&1; then
      local bound
      bound=$(docker inspect -f '{{range (index .HostConfig.PortBindings "22/tcp")}}{{.HostPort}}{{end}}' "$name")
      [[ "$bound" == "$port" ]] || die "$name exists but publishes port '$bound', not $port: remove it (docker rm -f $name)"
      if [[ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]]; then
        log "starting $name"
        docker start "$name" >/dev/null
      fi
      local mounts
      mounts=$(docker inspect -f '{{range .Mounts}}{{println .Destination}}{{end}}' "$name")
      if [[ ${#runtime[@]} -gt 0 ]] && ! grep -qxF "$sock_in" <<<"$mounts"; then
        log "WARNING: $name was created without the runtime socket: remove it (docker rm -f $name) to recreate"
      fi
    else
      log "creating $name on port $port"
      # --restart no: a stopped worker stays stopped, that is the failure drill.
      # Bounded: a tenant cannot take the whole host (see ORION_WORKER_PIDS above).
      docker run -d --name "$name" --hostname "$name" --restart no \
        --label "orion.platform=$project" -p "$port:22" \
        --pids-limit "$pids" --memory "$memory" --memory-swap "$memory" \
        --security-opt no-new-privileges ${runtime[@]+"${runtime[@]}"} \
        -e ORION_AUTHORIZED_KEY="$key" "$image" >/dev/null
    fi
    if ! docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{println $k}}{{end}}' "$name" \
        | grep -qxF "$apps_net"; then
      docker network connect "$apps_net" "$name"
    fi
  done
  write_inventory "$n"
}

write_inventory() {
  local n=$1 file=$dir/inventory.toml
  {
    echo "# Written by scripts/workers.sh up $n: worker_1..worker_$n on the Docker host."
    echo "# Orion (in a container) reaches them through host.docker.internal; clients"
    echo "# on the host use localhost. Format: see inventory/compose.toml."
    echo "# Apps: instances_join = the worker's container, whose PID and network namespaces"
    echo "# its app instances join; app_host = that container's name, where Caddy reaches"
    echo "# an instance's port on the network $apps_net."
    echo
    echo "[defaults]"
    echo "site = \"local\""
    echo "public_host = \"localhost\""
    for ((i = 1; i <= n; i++)); do
      echo
      echo "[[workers]]"
      echo "name = \"worker_$i\""
      echo "host = \"host.docker.internal\""
      echo "port = $((base + i))"
      local name="${prefix}worker_$i"
      echo "instances_join = \"$name\""
      echo "app_host = \"$name\""
    done
  } >"$file"
  # Read by orion's unprivileged user in its container; holds no secret.
  chmod 644 "$file"
  log "inventory of $n workers written to $file"
}

down() {
  local ids names name instances
  names=$(docker ps -a --filter "label=orion.platform=$project" --format '{{.Names}}')
  for name in $names; do
    # Its apps' instances: siblings on the engine, they would outlive it.
    instances=$(docker ps -aq --filter "label=orion.node=$name")
    # shellcheck disable=SC2086
    [[ -z "$instances" ]] || docker rm -f $instances >/dev/null
  done
  ids=$(docker ps -aq --filter "label=orion.platform=$project")
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086
    docker rm -f $ids >/dev/null
    log "removed $(wc -w <<<"$ids") worker(s)"
  fi
  if docker network inspect "$apps_net" >/dev/null 2>&1; then
    docker network rm "$apps_net" >/dev/null 2>&1 \
      || log "WARNING: $apps_net is still in use (Caddy still up?): not removed"
  fi
}

stop() {
  local ids
  ids=$(docker ps -q --filter "label=orion.platform=$project")
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086
    docker stop $ids >/dev/null
    log "stopped $(wc -w <<<"$ids") worker(s)"
  fi
}

status() {
  docker ps -a --filter "label=orion.platform=$project" \
    --format 'table {{.Names}}\t{{.Status}}\t{{.Ports}}'
}

case "${1:-}" in
  up) shift; up "$@" ;;
  stop) stop ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up N | stop | down | status" >&2; exit 2 ;;
esac
