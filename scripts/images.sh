#!/usr/bin/env bash
# Build all Orion images on top of the local base image (no registry needed):
#   orion/debian:bookworm  (scripts/base-image.sh)
#   orion/worker:latest    (docker/worker)
#   orion/mariadb:latest   (docker/mariadb)
#   orion/demo-app:latest  (docker/demo-app: a tiny HTTP server to try apps with)
#   orion/caddy:latest     (docker/caddy: the platform's edge, and the routing tests')
# Re-running is cheap: unchanged steps come from Docker's layer cache.
#
# Env: ORION_BUILD_NETWORK  network for RUN steps (default host: apt inside
#                           the build then resolves/routes exactly like the host)
#      DOCKER_BUILDKIT      default 0: the classic builder uses local images
#                           for FROM without ever asking a registry.
set -euo pipefail

cd "$(dirname "$0")/.."
BASE=orion/debian:bookworm
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

log() { echo "images: $*" >&2; }

t_all=$SECONDS
t=$SECONDS
scripts/base-image.sh >&2   # stdout stays clean for callers
log "base image ready in $((SECONDS - t))s"

build() {
  local tag=$1 dir=$2 t=$SECONDS out
  log "building $tag from $dir"
  # Quiet build; show the full log only if it fails.
  if ! out=$(docker build --network "${ORION_BUILD_NETWORK:-host}" \
      --build-arg BASE_IMAGE="$BASE" -t "$tag" "$dir" 2>&1); then
    printf '%s\n' "$out" >&2
    log "FAILED to build $tag"
    return 1
  fi
  log "built $tag in $((SECONDS - t))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

build orion/worker:latest docker/worker
build orion/mariadb:latest docker/mariadb
build orion/demo-app:latest docker/demo-app
build orion/caddy:latest docker/caddy
log "all images ready in $((SECONDS - t_all))s"
