#!/usr/bin/env bash
# Test infrastructure for Orion's integration tests.
#
#   scripts/test-infra.sh up    build images, start (or reuse) the test MariaDB,
#                               print the env the Rust tests read
#   scripts/test-infra.sh down  remove the test MariaDB and every container
#                               labelled orion.test=1 (workers started by tests)
#
# Use: export $(scripts/test-infra.sh up) && cargo test
# Env: ORION_TEST_DB_PORT  host port on 127.0.0.1 for MariaDB (default 13306)
set -euo pipefail

cd "$(dirname "$0")/.."
DB_CONTAINER=orion-test-mariadb
DB_IMAGE=orion/mariadb:latest
WORKER_IMAGE=orion/worker:latest
DB_PORT="${ORION_TEST_DB_PORT:-13306}"
DB_PASSWORD=orion-test
DEADLINE=60

log() { echo "test-infra: $*" >&2; }
die() { echo "test-infra: ERROR: $*" >&2; exit 1; }

# A real query over TCP inside the container: the socket-only server of the
# first-start initialisation can't answer it, only the final one can.
db_ready() {
  docker exec -e MYSQL_PWD="$DB_PASSWORD" "$DB_CONTAINER" \
    mariadb --protocol=tcp -h127.0.0.1 -uroot -N -e 'select 1' >/dev/null 2>&1
}

# The container we may reuse must match what we'd create now.
db_matches() {
  local image port
  image=$(docker inspect -f '{{.Image}}' "$DB_CONTAINER")
  # From the config, not `docker port`: that is empty for a stopped container.
  port=$(docker inspect -f '{{range (index .HostConfig.PortBindings "3306/tcp")}}{{.HostIp}}:{{.HostPort}}{{end}}' "$DB_CONTAINER" 2>/dev/null || true)
  [[ "$image" == "$(docker image inspect -f '{{.Id}}' "$DB_IMAGE")" && "$port" == "127.0.0.1:$DB_PORT" ]]
}

up() {
  scripts/docker-engine.sh
  scripts/images.sh >&2   # stdout carries only the env lines

  if docker container inspect "$DB_CONTAINER" >/dev/null 2>&1; then
    if ! db_matches; then
      log "existing $DB_CONTAINER is from an older image or another port: recreating"
      docker rm -f "$DB_CONTAINER" >/dev/null
    elif [[ "$(docker inspect -f '{{.State.Running}}' "$DB_CONTAINER")" != true ]]; then
      log "starting existing $DB_CONTAINER"
      docker start "$DB_CONTAINER" >/dev/null
    else
      log "reusing running $DB_CONTAINER"
    fi
  fi
  if ! docker container inspect "$DB_CONTAINER" >/dev/null 2>&1; then
    log "starting $DB_CONTAINER on 127.0.0.1:$DB_PORT"
    # No volume: test data is disposable and lives in the container layer.
    # Not labelled orion.test=1 on purpose: tests may clean up their workers
    # by that label without killing the database.
    docker run -d --name "$DB_CONTAINER" --label orion.test.infra=1 \
      -p "127.0.0.1:$DB_PORT:3306" \
      -e MARIADB_ROOT_PASSWORD="$DB_PASSWORD" \
      "$DB_IMAGE" >/dev/null
  fi

  local t=$SECONDS
  until db_ready; do
    if [[ "$(docker inspect -f '{{.State.Running}}' "$DB_CONTAINER")" != true ]] || ((SECONDS - t >= DEADLINE)); then
      docker logs --tail 50 "$DB_CONTAINER" >&2 || true
      die "$DB_CONTAINER did not answer 'select 1' within ${DEADLINE}s (logs above)"
    fi
    sleep 0.5
  done
  log "MariaDB ready on 127.0.0.1:$DB_PORT ($((SECONDS - t))s)"

  echo "ORION_TEST_DATABASE_URL=mysql://root:$DB_PASSWORD@127.0.0.1:$DB_PORT"
  echo "ORION_TEST_WORKER_IMAGE=$WORKER_IMAGE"
}

down() {
  local ids
  ids=$(docker ps -aq --filter label=orion.test=1)
  if docker container inspect "$DB_CONTAINER" >/dev/null 2>&1; then
    ids+=$'\n'"$DB_CONTAINER"
  fi
  if [[ -n "${ids//[[:space:]]/}" ]]; then
    # -v: also drop anonymous volumes, never named ones.
    # shellcheck disable=SC2086
    docker rm -f -v $ids >/dev/null
    log "removed $(wc -w <<<"$ids") container(s)"
  else
    log "nothing to remove"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
