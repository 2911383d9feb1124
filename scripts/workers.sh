#!/usr/bin/env bash
# Orion's data plane: sshd worker containers on the Docker host, with or without sites.
#
#   scripts/workers.sh up N            start worker_1..worker_N (sshd on host ports 22221..),
#                                      with Orion's public key, and write the matching inventory
#   scripts/workers.sh up N --site S   make sure site S has N workers, worker_S_1..worker_S_N,
#                                      on the site's own network (see Sites below); on a
#                                      running platform Orion takes them on with no restart
#   scripts/workers.sh stop            stop them all, keeping their identity (host keys) and accounts
#   scripts/workers.sh down            remove them all, their apps' instances and the site networks
#   scripts/workers.sh status          list them, and the sites
#   scripts/workers.sh cut SITE|all    disconnect Orion's containers from a site's network
#                                      (or every site's): the "Orion cut off" drill
#   scripts/workers.sh heal SITE|all   connect them again (to any site network they miss)
#
# Containers are named worker_1… so the failure drill is literally `docker stop worker_1`.
# Env: ORION_PROJECT (default orion): state lives in .platform/$ORION_PROJECT
#      ORION_WORKER_PREFIX (default empty): prefix of container names
#      ORION_WORKER_BASE_PORT (default 22220): worker i listens on base + i; the sites'
#        ports are counted from it too (below)
#      ORION_WORKER_PIDS (default 1024): most processes and threads in one worker
#        (docker run --pids-limit), so a tenant's fork bomb stays inside its worker
#      ORION_WORKER_MEMORY (default 512m): most memory of one worker, swap included
#        (--memory and --memory-swap), so a memory hog is OOM-killed inside it.
#        Limits, not reservations: idle workers cost what they use.
#      Every worker also runs with --security-opt no-new-privileges, and with the
#      kernel's floor of privileged ports (net.ipv4.ip_unprivileged_port_start=1024:
#      containers lower it to 0, and a tenant could take port 22 while sshd re-execs
#      to load its host certificate). The limits apply
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
#
# Sites: site S (1-32 of a-z, 0-9 and -, not starting with -) stands for a room or a data
# centre of its own: a Docker network `$ORION_PROJECT-site-S` and the workers on it,
# containers ${ORION_WORKER_PREFIX}worker_S_i, named worker_S_i with `site = "S"` in the
# inventory. Orion reaches them by container name, on port 22, over that network: every
# orion container of the project is connected to every site network (by `up --site`
# here, by platform.sh up once compose has made them), and cutting that link is the drill
# of a control plane cut off from its sites. They join the apps network too (Caddy, the
# edge, reaches their instances there as it does the others'). `up --site` never removes:
# the inventory keeps every worker a site has had until `down`.
# Ports: every worker still publishes its sshd on the host, for clients there (the
# inventory's public_port). Workers without a site use base+1.. (at most 99 of them once
# there are sites); each site takes, when first made, the next block of 100 ports after
# the last one (base+101.., base+201.., …: at most 99 workers a site), so that no two
# workers' ports ever meet. .platform/$ORION_PROJECT/sites records it, one line a site:
# "S COUNT BASE" (worker i publishes BASE + i), and "- COUNT BASE" for the workers without
# a site (the N of the last `up N`).
# Live: the inventory is rewritten in place (the same file, bind-mounted into the orion
# containers) and every running orion container then gets SIGHUP, on which Orion reloads
# it and applies the difference.
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
# Which workers exist, by site (format above).
state=$dir/sites
# Ports of a site's block: its workers are BASE+1..BASE+block-1.
block=100
# As compose names projects (its containers' label): lower case, letters, digits, - and _.
compose_project=$(tr '[:upper:]' '[:lower:]' <<<"$project" | tr -cd 'a-z0-9_-')

sock=/var/run/docker.sock
sock_in=/var/lib/orion/runtime/docker.sock

log() { echo "workers: $*" >&2; }
die() { echo "workers: ERROR: $*" >&2; exit 1; }

site_net() { echo "$project-site-$1"; }

valid_site() { [[ "$1" =~ ^[a-z0-9][a-z0-9-]{0,31}$ ]]; }

# The recorded rows, "SITE COUNT BASE" ("-" for the workers without a site), oldest first.
rows() { [[ -e "$state" ]] || return 0; grep -vE '^[[:space:]]*(#|$)' "$state" || true; }

# The sites, oldest first.
sites() { rows | awk '$1 != "-" { print $1 }'; }

# "COUNT BASE" of a site (or of "-"), nothing if it is not recorded.
row_of() { rows | awk -v s="$1" '$1 == s { print $2, $3; exit }'; }

# Records "SITE COUNT BASE", in place of the site's line if it had one (its order kept).
record() {
  local site=$1 count=$2 sbase=$3 tmp
  tmp=$(mktemp "$dir/.sites.XXXXXX")
  {
    echo "# Written by scripts/workers.sh: SITE COUNT BASE (worker i publishes BASE + i);"
    echo "# \"-\" is the workers without a site. Removed by 'scripts/workers.sh down'."
    rows | awk -v s="$site" -v c="$count" -v b="$sbase" '
      $1 == s { print s, c, b; done = 1; next } { print } END { if (!done) print s, c, b }'
  } >"$tmp"
  mv "$tmp" "$state"
}

# How many workers without a site the inventory lists: the N of the last `up N`. A
# platform made before sites were recorded has none in $state: its existing containers
# worker_1..worker_K say it (never list a worker that is not there).
unsited_count() {
  local row k=0
  row=$(row_of -)
  if [[ -n "$row" ]]; then echo "${row%% *}"; return; fi
  while docker container inspect "${prefix}worker_$((k + 1))" >/dev/null 2>&1; do k=$((k + 1)); done
  echo "$k"
}

# The project's orion containers (every replica), running or not: a stopped one keeps
# the networks it is given and has them when it starts.
orion_containers() {
  docker ps -a --filter "label=com.docker.compose.project=$compose_project" \
    --filter "label=com.docker.compose.service=orion" --format '{{.Names}}'
}

on_network() {
  docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{println $k}}{{end}}' "$1" \
    | grep -qxF "$2"
}

ensure_network() {
  local net=$1
  if ! docker network inspect "$net" >/dev/null 2>&1; then
    log "creating the network $net"
    docker network create --label "orion.platform=$project" "$net" >/dev/null
  fi
}

# Starts or creates one worker container publishing sshd on host port $2, on the
# networks $3… (the first is the one it is created on). Uses up's key and runtime.
ensure_worker() {
  local name=$1 port=$2 net
  shift 2
  if docker container inspect "$name" >/dev/null 2>&1; then
    local bound
    bound=$(docker inspect -f '{{range (index .HostConfig.PortBindings "22/tcp")}}{{.HostPort}}{{end}}' "$name")
    [[ "$bound" == "$port" ]] || die "$name exists but publishes port '$bound', not $port: remove it (docker rm -f $name)"
    # Networks before the start: a worker cut from its site's network would come up
    # where Orion cannot reach it.
    for net in "$@"; do
      on_network "$name" "$net" || docker network connect "$net" "$name"
    done
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
      --label "orion.platform=$project" -p "$port:22" --network "$1" \
      --pids-limit "$pids" --memory "$memory" --memory-swap "$memory" \
      --security-opt no-new-privileges --sysctl net.ipv4.ip_unprivileged_port_start=1024 \
      ${runtime[@]+"${runtime[@]}"} \
      -e ORION_AUTHORIZED_KEY="$key" "$image" >/dev/null
    shift
    for net in "$@"; do
      docker network connect "$net" "$name"
    done
  fi
}

up() {
  local n='' site='' arg
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      --site) (($#)) || die "--site needs a site name"; site=$1; shift ;;
      --site=*) site=${arg#--site=} ;;
      *) [[ -z "$n" ]] || die "usage: $0 up N [--site S]"; n=$arg ;;
    esac
  done
  n=${n:-3}
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number (got '$n')"
  [[ "$base" =~ ^[1-9][0-9]*$ ]] || die "ORION_WORKER_BASE_PORT must be a port number (got '$base')"
  [[ "$pids" =~ ^[1-9][0-9]*$ ]] || die "ORION_WORKER_PIDS must be a positive number (got '$pids')"
  [[ "$memory" =~ ^[1-9][0-9]*[kmg]?$ ]] || die "ORION_WORKER_MEMORY must be a size such as 512m or 2g (got '$memory')"
  if [[ -n "$site" ]]; then
    valid_site "$site" || die "a site is 1 to 32 of a-z, 0-9 and -, not starting with - (got '$site')"
    ((n < block)) || die "a site has at most $((block - 1)) workers (its ports are one block of $block)"
  fi
  local pub=$dir/orion_ed25519.pub
  [[ -s "$pub" ]] || die "no Orion public key at $pub: run scripts/platform.sh up (it makes one)"
  docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing: run scripts/images.sh"
  local key runtime=()
  key=$(cat "$pub")
  if [[ -S "$sock" ]]; then
    runtime=(-v "$sock:$sock_in")
  else
    log "WARNING: no Docker socket at $sock: apps cannot run on these workers"
  fi
  ensure_network "$apps_net"
  local i unsited
  unsited=$(unsited_count)
  if [[ -z "$site" ]]; then
    # The sites' blocks start at base+block: the workers without a site stay below.
    [[ -z "$(sites)" ]] || ((n < block)) \
      || die "with sites, at most $((block - 1)) workers without a site (the sites' ports start at $((base + block)))"
    for ((i = 1; i <= n; i++)); do
      # On Docker's default network, as ever: Orion reaches them through the host.
      ensure_worker "${prefix}worker_$i" $((base + i)) bridge "$apps_net"
    done
    record - "$n" "$base"
    log "$n workers without a site"
  else
    ((unsited < block)) \
      || die "$unsited workers without a site use the ports a site would take: at most $((block - 1)) beside sites"
    local row count=0 sbase last
    row=$(row_of "$site")
    if [[ -n "$row" ]]; then
      read -r count sbase <<<"$row"
    else
      # The next block after the last one given: made in the same order, the same ports.
      last=$(rows | awk -v b="$base" '$1 != "-" && $3 > b { b = $3 } END { print b }')
      sbase=$((last + block))
      log "site $site takes host ports $((sbase + 1))..$((sbase + block - 1))"
    fi
    # Never fewer than it had: a worker left out of the inventory would be retired. All
    # of them started: the inventory lists them all.
    ((count > n)) || count=$n
    ((sbase + count <= 65535)) || die "site $site's ports would pass 65535: lower ORION_WORKER_BASE_PORT"
    local net; net=$(site_net "$site")
    ensure_network "$net"
    for ((i = 1; i <= count; i++)); do
      ensure_worker "${prefix}worker_${site}_$i" $((sbase + i)) "$net" "$apps_net"
    done
    record "$site" "$count" "$sbase"
    log "site $site: $count workers on $net"
    # Orion reaches them over that network, before it is told they exist; and every
    # site's, should a replica have been made again since (a cut site is healed too).
    # shellcheck disable=SC2046 # site names have no spaces
    attach $(sites)
  fi
  write_inventory
  reload_orion
}

write_inventory() {
  local file=$dir/inventory.toml unsited site count sbase i name out total
  unsited=$(unsited_count)
  total=$unsited
  # Built whole, then written at once into the same file: it is bind-mounted (by inode)
  # into the orion containers, so it is never replaced, and never read half-made.
  out=$(
    echo "# Written by scripts/workers.sh up: the workers on the Docker host. Format: see"
    echo "# inventory/compose.toml. Without a site, worker_1..: Orion (in a container) reaches"
    echo "# them through host.docker.internal, clients on the host use localhost. Site S,"
    echo "# worker_S_1..: Orion reaches them by container name on the network $project-site-S,"
    echo "# clients on the host at localhost:public_port."
    echo "# Apps: instances_join = the worker's container, whose PID and network namespaces"
    echo "# its app instances join; app_host = that container's name, where Caddy reaches"
    echo "# an instance's port on the network $apps_net."
    echo
    echo "[defaults]"
    echo "site = \"local\""
    echo "public_host = \"localhost\""
    for ((i = 1; i <= unsited; i++)); do
      name="${prefix}worker_$i"
      echo
      echo "[[workers]]"
      echo "name = \"worker_$i\""
      echo "host = \"host.docker.internal\""
      echo "port = $((base + i))"
      echo "instances_join = \"$name\""
      echo "app_host = \"$name\""
    done
    while read -r site count sbase; do
      [[ "$site" != - ]] || continue
      for ((i = 1; i <= count; i++)); do
        name="${prefix}worker_${site}_$i"
        echo
        echo "[[workers]]"
        echo "name = \"worker_${site}_$i\""
        echo "host = \"$name\""
        echo "port = 22"
        echo "public_port = $((sbase + i))"
        echo "site = \"$site\""
        echo "instances_join = \"$name\""
        echo "app_host = \"$name\""
      done
    done < <(rows)
  )
  printf '%s\n' "$out" >"$file"
  # Read by orion's unprivileged user in its container; holds no secret.
  chmod 644 "$file"
  while read -r site count sbase; do
    [[ "$site" == - ]] || total=$((total + count))
  done < <(rows)
  log "inventory of $total workers written to $file"
}

# Orion reloads its inventory on SIGHUP and applies the difference (new workers probed
# and offered, removed ones retired): no restart, rentals and the gateway untouched.
reload_orion() {
  local c running
  running=$(docker ps --filter "label=com.docker.compose.project=$compose_project" \
    --filter "label=com.docker.compose.service=orion" --format '{{.Names}}')
  for c in $running; do
    if docker kill -s HUP "$c" >/dev/null 2>&1; then
      log "sent SIGHUP to $c: it reloads the inventory"
    else
      log "WARNING: could not send SIGHUP to $c: restart it to read the new inventory"
    fi
  done
}

# The sites named by "SITE|all" (all: every recorded one).
pick_sites() {
  local which=${1:-}
  [[ -n "$which" ]] || die "name a site, or all"
  if [[ "$which" == all ]]; then
    sites
  else
    grep -qxF -- "$which" <<<"$(sites)" || die "no site '$which' here (sites: $(sites | xargs))"
    echo "$which"
  fi
}

# Connects every orion container to the networks of the sites named, where it is not yet.
attach() {
  local site net c
  for site in "$@"; do
    net=$(site_net "$site")
    docker network inspect "$net" >/dev/null 2>&1 || { log "WARNING: no network $net (site $site): run up --site $site"; continue; }
    for c in $(orion_containers); do
      if ! on_network "$c" "$net"; then
        docker network connect "$net" "$c"
        log "connected $c to $net"
      fi
    done
  done
}

heal() {
  local picked
  picked=$(pick_sites "${1:-}")
  # shellcheck disable=SC2086 # site names have no spaces
  [[ -z "$picked" ]] || attach $picked
}

cut() {
  local picked site net c
  picked=$(pick_sites "${1:-}")
  [[ -n "$picked" ]] || die "no sites here: make one with 'scripts/workers.sh up N --site S'"
  [[ -n "$(orion_containers)" ]] || log "WARNING: no orion container in project $project: nothing to cut"
  for site in $picked; do
    net=$(site_net "$site")
    for c in $(orion_containers); do
      if on_network "$c" "$net"; then
        docker network disconnect "$net" "$c"
        log "disconnected $c from $net: Orion cannot reach site $site (heal with 'heal $site')"
      fi
    done
  done
}

down() {
  local ids names name instances net
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
  for net in $(docker network ls --filter "label=orion.platform=$project" --format '{{.Name}}'); do
    [[ "$net" == "$project-site-"* ]] || continue
    if docker network rm "$net" >/dev/null 2>&1; then
      log "removed the network $net"
    else
      log "WARNING: $net is still in use (orion still up?): not removed"
    fi
  done
  # The workers are gone: a site made again starts from the first block.
  rm -f "$state"
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
  [[ -n "$(sites)" ]] || return 0
  local site count sbase net running orion c on total
  echo
  printf '%-12s %-8s %-8s %-13s %-28s %s\n' SITE WORKERS RUNNING "SSH PORTS" NETWORK ORION
  orion=$(orion_containers)
  while read -r site count sbase; do
    [[ "$site" != - ]] || continue
    net=$(site_net "$site")
    running=$(docker ps -q --filter "label=orion.platform=$project" --filter "network=$net" | wc -l)
    on=0 total=0
    for c in $orion; do
      total=$((total + 1))
      if on_network "$c" "$net"; then on=$((on + 1)); fi
    done
    if ((total == 0)); then c="-"
    elif ((on == total)); then c="attached"
    elif ((on == 0)); then c="cut"
    else c="attached $on/$total"
    fi
    printf '%-12s %-8s %-8s %-13s %-28s %s\n' "$site" "$count" "$running" \
      "$((sbase + 1))-$((sbase + count))" "$net" "$c"
  done < <(rows)
}

case "${1:-}" in
  up) shift; up "$@" ;;
  stop) stop ;;
  down) down ;;
  status) status ;;
  cut) cut "${2:-}" ;;
  heal) heal "${2:-}" ;;
  *) echo "usage: $0 up N [--site S] | stop | down | status | cut SITE|all | heal SITE|all" >&2; exit 2 ;;
esac
