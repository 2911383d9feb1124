#!/usr/bin/env bash
# The whole Orion platform on this Docker host, in one command.
#
#   scripts/platform.sh up [N]          images, keys, .env, N workers (default 3),
#                                       control plane (Caddy, orion, MariaDB); prints how to rent
#   scripts/platform.sh up --ha [N]     the same with no single control-plane box: three
#                                       MariaDB Galera nodes, HAProxy, ORION_REPLICAS orion
#                                       replicas (default 2) and Caddy over them
#                                       (docker-compose.ha.yml). A platform keeps the
#                                       profile it was made with until `down --volumes`.
#   scripts/platform.sh up --sites N [W]  the workers in N sites a, b, c… (N up to 26), W
#                                       each (default: the worker count given, else 2), each
#                                       site on a Docker network of its own that orion joins
#                                       (scripts/workers.sh: Sites). With or without --ha, in
#                                       any order. A platform keeps its sites: a later `up`
#                                       starts them again, `--sites` may add more, never fewer.
#   scripts/platform.sh down [--volumes] remove the control plane and stop the workers;
#                                        --volumes: remove the workers, the site networks
#                                        and the data too
#   scripts/platform.sh status           services, workers, sites, health
#   scripts/platform.sh cut SITE|all     drill: cut orion off a site's network (or all sites')
#   scripts/platform.sh heal SITE|all    connect it again
#
# Generated state (keys, passwords, inventory, Caddy's root certificate) lives in
# .platform/$ORION_PROJECT (mode 700, never committed).
# Env: ORION_PROJECT (default orion)  compose project name; several platforms can coexist
#      ORION_HTTPS_PORT (default 443) host port of Caddy's HTTPS
#      ORION_GATEWAY_PORTS (default 2200-2219) host ports of the SSH gateway: one per
#                                     rental, stable across its moves
#      ORION_WORKER_PREFIX, ORION_WORKER_BASE_PORT: see scripts/workers.sh
#      ORION_BINARY: use this orion binary instead of `cargo build --release`
#      ORION_EXECUTOR (default native)  provisioning executor: native or ansible
#      ORION_REPLICAS (default 2)       orion replicas of an --ha platform
set -euo pipefail
cd "$(dirname "$0")/.."

project=${ORION_PROJECT:-orion}
dir=.platform/$project
export ORION_PROJECT=$project

log() { echo "platform: $*" >&2; }
die() { echo "platform: ERROR: $*" >&2; exit 1; }

compose_cmd() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose"
  else
    die "neither 'docker compose' nor 'docker-compose' is installed"
  fi
}

# The profile the platform was made with (ORION_PROFILE in its .env): single or ha.
profile() { grep -E '^ORION_PROFILE=' "$dir/.env" 2>/dev/null | cut -d= -f2 || true; }

# How many sites its workers are in (ORION_SITES in its .env): 0 for none, the workers
# then being worker_1.. without a site.
sites_made() { grep -E '^ORION_SITES=' "$dir/.env" 2>/dev/null | cut -d= -f2 || true; }

# What scripts/workers.sh recorded of the workers, "SITE COUNT BASE" a line ("-": the
# workers without a site).
recorded() { grep -vE '^[[:space:]]*(#|$)' "$dir/sites" 2>/dev/null || true; }

# The first N sites' names: a, b, c…
site_names() { local all=({a..z}); printf '%s\n' "${all[@]:0:$1}"; }

compose_file() {
  if [[ "$(profile)" == ha ]]; then echo docker-compose.ha.yml; else echo docker-compose.yml; fi
}

compose() {
  # shellcheck disable=SC2046
  $(compose_cmd) -p "$project" --env-file "$dir/.env" -f "$(compose_file)" "$@"
}

# The container names of the orion replicas, as the compose tool names scaled services:
# Caddy checks and balances over each one (static upstreams get active health checks).
replica_upstreams() {
  local n=$1 sep=_ i names=() name
  [[ "$(compose_cmd)" == "docker compose" ]] && sep=-
  # As compose names projects: lower case, only letters, digits, - and _.
  name=$(tr '[:upper:]' '[:lower:]' <<<"$project" | tr -cd 'a-z0-9_-')
  for ((i = 1; i <= n; i++)); do names+=("${name}${sep}orion${sep}$i:8080"); done
  echo "${names[*]}"
}

https_port() { grep -E '^ORION_HTTPS_PORT=' "$dir/.env" | cut -d= -f2; }

random_secret() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }

ensure_key() {
  local key=$dir/orion_ed25519
  if [[ -e "$key" ]]; then
    # Root of the host may read it even once it belongs to the container's user.
    [[ -s "$key.pub" ]] || die "$key exists but $key.pub does not: delete $key to have a new key made (the workers get the new one on their next 'up')"
    return
  fi
  log "making Orion's SSH key $key"
  ssh-keygen -q -t ed25519 -N '' -C "orion@$project" -f "$key"
  # orion runs as uid 10001 in its container and refuses a key others can read.
  docker run --rm -v "$PWD/$dir:/p" orion/debian:bookworm \
    sh -c 'chown 10001:10001 /p/orion_ed25519 && chmod 600 /p/orion_ed25519'
}

# Orion's SSH host certificate authority: it signs every worker's host key, so tenants
# trust one `@cert-authority` line (GET /api/ssh/known_hosts). A file here rather than
# made by orion itself, so that every orion replica signs with the same key.
ensure_host_ca() {
  local key=$dir/host_ca_ed25519
  [[ -e "$key" ]] && return
  log "making Orion's SSH host certificate authority $key"
  ssh-keygen -q -t ed25519 -N '' -C "orion-host-ca@$project" -f "$key"
  docker run --rm -v "$PWD/$dir:/p" orion/debian:bookworm \
    sh -c 'chown 10001:10001 /p/host_ca_ed25519 && chmod 600 /p/host_ca_ed25519'
}

ensure_env() {
  local env=$dir/.env
  if [[ ! -e "$env" ]]; then
    log "writing $env with fresh database passwords"
    (umask 077 && cat >"$env") <<ENV
# Generated by scripts/platform.sh; read by docker-compose. Keep it private.
ORION_DB_ROOT_PASSWORD=$(random_secret)
ORION_DB_PASSWORD=$(random_secret)
ORION_ADMIN_TOKEN=$(random_secret)
ORION_HTTPS_PORT=${ORION_HTTPS_PORT:-443}
ORION_INVENTORY=$PWD/$dir/inventory.toml
ORION_SSH_KEY=$PWD/$dir/orion_ed25519
ORION_PROFILE=$wanted_profile
ORION_SITES=${wanted_sites:-0}
ENV
  fi
  # Added after the first platforms were made: appended to an older .env.
  grep -qE '^ORION_HOST_CA_KEY=.+' "$env" || echo "ORION_HOST_CA_KEY=$PWD/$dir/host_ca_ed25519" >>"$env"
  grep -qE '^ORION_GATEWAY_PORTS=.+' "$env" || echo "ORION_GATEWAY_PORTS=${ORION_GATEWAY_PORTS:-2200-2219}" >>"$env"
  # A platform made before profiles existed is a single one.
  grep -qE '^ORION_PROFILE=.+' "$env" || echo "ORION_PROFILE=single" >>"$env"
  [[ "$(profile)" == "$wanted_profile" ]] \
    || die "platform '$project' was made with the $(profile) profile; 'scripts/platform.sh down --volumes' first to make it again as $wanted_profile"
  # A platform made before sites existed has none.
  grep -qE '^ORION_SITES=[0-9]+$' "$env" || echo "ORION_SITES=0" >>"$env"
  local made; made=$(sites_made)
  if [[ -z "$wanted_sites" ]]; then
    # A later `up` starts the sites the platform was made with.
    wanted_sites=$made
  elif ((made == 0 && wanted_sites > 0)); then
    # Its workers without a site would stay in the inventory beside the sites' unstarted.
    die "platform '$project' was made without sites; 'scripts/platform.sh down --volumes' first to make it again with $wanted_sites"
  elif ((wanted_sites < made)); then
    die "platform '$project' has $made sites and never drops one; 'scripts/platform.sh down --volumes' first to make it again with $wanted_sites"
  elif ((wanted_sites > made)); then
    log "adding sites: $made -> $wanted_sites"
    sed -i "s/^ORION_SITES=.*/ORION_SITES=$wanted_sites/" "$env"
  fi
  if [[ "$wanted_profile" == ha ]]; then
    grep -qE '^ORION_DB_SST_PASSWORD=.+' "$env" || echo "ORION_DB_SST_PASSWORD=$(random_secret)" >>"$env"
    sed -i '/^ORION_API_UPSTREAMS=/d' "$env"
    echo "ORION_API_UPSTREAMS=$(replica_upstreams "$replicas")" >>"$env"
  fi
  local var
  for var in ORION_DB_ROOT_PASSWORD ORION_DB_PASSWORD ORION_ADMIN_TOKEN ORION_HTTPS_PORT ORION_INVENTORY ORION_SSH_KEY; do
    grep -qE "^$var=.+" "$env" || die "$env has no $var. Delete $env and run 'scripts/platform.sh down --volumes' (the database was made with the old passwords), then 'up' again"
  done
}

# Runs a build, showing its log only if it fails.
build_quietly() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    die "build failed: $*"
  fi
}

build_images() {
  scripts/images.sh
  export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
  local binary=${ORION_BINARY:-}
  if [[ -z "$binary" ]]; then
    log "building the orion binary (cargo build --release)"
    cargo build --release --quiet --bin orion
    binary=target/release/orion
  fi
  [[ -x "$binary" ]] || die "orion binary $binary not found"
  # The build context is the repository; .dockerignore lets only this path in.
  mkdir -p target/orion-image
  cp "$binary" target/orion-image/orion
  log "building orion/orion"
  build_quietly docker build --network host --build-arg BASE_IMAGE=orion/debian:bookworm \
    --build-arg BINARY=target/orion-image/orion -f docker/orion/Dockerfile -t orion/orion:latest .
  if [[ "$wanted_profile" == ha ]]; then
    log "building orion/galera and orion/haproxy"
    build_quietly docker build --network host --build-arg BASE_IMAGE=orion/mariadb:latest \
      -t orion/galera:latest docker/galera
    build_quietly docker build --network host --build-arg BASE_IMAGE=orion/debian:bookworm \
      -t orion/haproxy:latest docker/haproxy
  fi
}

wait_healthy() {
  local port deadline=$((SECONDS + 180)) cert=$dir/caddy-root.crt
  port=$(https_port)
  log "waiting for https://localhost:$port/health through Caddy"
  until compose exec -T caddy cat /data/caddy/pki/authorities/local/root.crt >"$cert" 2>/dev/null \
      && [[ -s "$cert" ]] \
      && curl -fsS --cacert "$cert" -o /dev/null "https://localhost:$port/health" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      compose ps >&2 || true
      compose logs --tail 30 >&2 || true
      return 1
    fi
    sleep 1
  done
}

# An --ha platform is up once all three Galera nodes are synced: a joiner may still be
# receiving its copy of the state (SST) when the API first answers.
wait_cluster() {
  local deadline=$((SECONDS + 300)) node id
  log "waiting for the three Galera nodes to be synced"
  for node in galera-1 galera-2 galera-3; do
    id=$(compose ps -q "$node")
    until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null)" == healthy ]]; do
      ((SECONDS < deadline)) || { compose logs --tail 30 "$node" >&2 || true; return 1; }
      sleep 1
    done
  done
}

up() {
  wanted_profile=single wanted_sites=''
  local n='' arg
  # Flags in any order: --ha, --sites N, and the number of workers (per site with --sites).
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      --ha) wanted_profile=ha ;;
      --sites) (($#)) || die "--sites needs a number of sites"; wanted_sites=$1; shift ;;
      --sites=*) wanted_sites=${arg#--sites=} ;;
      *) [[ -z "$n" ]] || die "usage: $0 up [--ha] [--sites N] [W]"; n=$arg ;;
    esac
  done
  [[ -z "$wanted_sites" || "$wanted_sites" =~ ^([1-9]|1[0-9]|2[0-6])$ ]] \
    || die "--sites takes 1 to 26 sites (got '$wanted_sites')"
  replicas=${ORION_REPLICAS:-2}
  [[ "$replicas" =~ ^[1-8]$ ]] || die "ORION_REPLICAS must be 1 to 8 (got '$replicas')"
  [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of workers (got '$n')"
  scripts/docker-engine.sh
  command -v curl >/dev/null || die "curl is needed to check the platform"
  compose_cmd >/dev/null
  mkdir -p "$dir" && chmod 700 "$dir"
  scripts/base-image.sh >&2
  ensure_key
  ensure_host_ca
  ensure_env
  # Workers per site (default 2; a site that has more keeps them), else workers.
  if ((wanted_sites > 0)); then n=${n:-2}; else n=${n:-3}; fi
  build_images
  # From here on, a failure takes down what was started: nothing half-started stays.
  trap 'log "start failed; taking down what was started"; compose down >/dev/null 2>&1 || true; scripts/workers.sh down || true' ERR
  # The workers asked for (sites a, b… or workers without a site), then any others
  # scripts/workers.sh has recorded (added to the running platform since): every worker
  # the inventory lists runs again.
  local site sites=() k
  if ((wanted_sites > 0)); then
    mapfile -t sites < <(site_names "$wanted_sites")
    for site in "${sites[@]}"; do scripts/workers.sh up "$n" --site "$site"; done
    k=$(recorded | awk '$1 == "-" { print $2 }')
    [[ -z "$k" || "$k" == 0 ]] || scripts/workers.sh up "$k"
  else
    scripts/workers.sh up "$n"
  fi
  for site in $(recorded | awk '$1 != "-" { print $1 }'); do
    # `up 1`: at least one, and a site keeps (and starts) all the workers it has.
    [[ " ${sites[*]} " == *" $site "* ]] || scripts/workers.sh up 1 --site "$site"
  done
  if [[ "$wanted_profile" == ha ]]; then
    compose up -d --scale orion="$replicas"
  else
    compose up -d
  fi
  # Orion reaches the sites' workers over their networks: compose has just made (or
  # made again) its containers, on its own networks only.
  scripts/workers.sh heal all
  wait_healthy || { log "the platform did not become healthy"; false; }
  if [[ "$wanted_profile" == ha ]]; then
    wait_cluster || { log "the Galera cluster did not form"; false; }
  fi
  trap - ERR
  local port what first=worker_1 drill='' all
  port=$(https_port)
  what="$(recorded | awk '{ t += $2 } END { print t + 0 }') workers"
  all=$(recorded | awk '$1 != "-" { print $1 }' | xargs)
  if [[ -n "$all" ]]; then
    what="$what, sites $all"
    if ((wanted_sites > 0)); then first=worker_a_1; fi
    drill="
  scripts/platform.sh cut ${all%% *}                   # the sites drill: Orion cut off a site
  scripts/platform.sh heal ${all%% *}"
  fi
  cat <<MSG

Orion is up ($wanted_profile profile): $what, API at https://localhost:$port (Caddy, internal CA).
Trust Caddy's root certificate and use the admin token (or a tenant token from
POST /api/tokens):

  CA=$dir/caddy-root.crt
  TOKEN=\$(grep ^ORION_ADMIN_TOKEN= $dir/.env | cut -d= -f2)
  curl --cacert \$CA -H "Authorization: Bearer \$TOKEN" -X POST https://localhost:$port/api/rent \\
       --json "{\"ssh_public_key\": \"\$(cat ~/.ssh/id_ed25519.pub)\"}"
  curl --cacert \$CA -H "Authorization: Bearer \$TOKEN" https://localhost:$port/api/ssh/known_hosts >> ~/.ssh/known_hosts
  ssh -p <endpoint.port> <username>@localhost # from the answer: the rental's own port
  docker stop ${ORION_WORKER_PREFIX:-}$first                  # the failure drill
  ssh -p <endpoint.port> <username>@localhost # the same endpoint, the same files
  curl --cacert \$CA -H "Authorization: Bearer \$TOKEN" https://localhost:$port/api/rentals/<id>$drill

Tear down with: scripts/platform.sh down   (add --volumes to drop the data and workers)
MSG
}

down() {
  if [[ -e "$dir/.env" ]]; then
    if [[ "$(profile)" == ha && "${1:-}" != "--volumes" ]]; then
      # One node after the other, galera-1 last: the last to leave is the one Galera
      # marks safe to start the cluster again from, and `up` finds it so.
      compose stop orion >/dev/null 2>&1 || true
      compose stop galera-3 galera-2 >/dev/null 2>&1 || true
      compose stop galera-1 >/dev/null 2>&1 || true
    fi
    if [[ "${1:-}" == "--volumes" ]]; then
      compose down --volumes --remove-orphans
    else
      compose down --remove-orphans
    fi
  fi
  if [[ "${1:-}" == "--volumes" ]]; then
    scripts/workers.sh down
    # The passwords belong to the database that was just dropped.
    rm -f "$dir/.env"
  else
    # Stopped, not removed: their host keys and tenants' accounts are state the
    # database refers to; `up` starts them again.
    scripts/workers.sh stop
  fi
}

status() {
  [[ -e "$dir/.env" ]] || die "no platform '$project' here (no $dir/.env): run scripts/platform.sh up"
  compose ps
  scripts/workers.sh status
  local port; port=$(https_port)
  curl -sS --cacert "$dir/caddy-root.crt" "https://localhost:$port/health" || true
  echo
  # Fleet counts and loop status are the admin's; the token stays out of the process list.
  local token; token=$(grep -E '^ORION_ADMIN_TOKEN=' "$dir/.env" | cut -d= -f2)
  curl -sS --cacert "$dir/caddy-root.crt" -H @<(printf 'Authorization: Bearer %s\n' "$token") \
    "https://localhost:$port/api/status" || true
  echo
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  status) status ;;
  # The drill is the workers' side's: it knows the sites and their networks.
  cut | heal) scripts/workers.sh "$@" ;;
  *) echo "usage: $0 up [--ha] [--sites N] [N] | down [--volumes] | status | cut SITE|all | heal SITE|all" >&2; exit 2 ;;
esac
