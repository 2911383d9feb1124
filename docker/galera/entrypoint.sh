#!/bin/bash
# Starts one node of Orion's MariaDB Galera cluster, with no hand work in any of the
# cases a cluster meets:
#
# - first start of the bootstrap node (GALERA_BOOTSTRAP=yes, empty datadir): initialise
#   the database (orion/mariadb's entrypoint: root, Orion's database and user, and the
#   state-transfer user), then start a new cluster;
# - first start of any other node: wait until a member answers, then join; the whole
#   state arrives by SST (mariadb-backup);
# - a node coming back (crash, `docker kill`, restart): join; what it missed arrives by
#   IST from the members' write-set cache, or by SST if it missed too much;
# - the whole cluster starting again after a clean stop: the node Galera marked
#   `safe_to_bootstrap: 1` (the last to leave) starts a new cluster once it finds no
#   member answering; the others join it.
#
# Env: MARIADB_ROOT_PASSWORD, MARIADB_DATABASE, MARIADB_USER, MARIADB_PASSWORD
#        as for orion/mariadb (used on the bootstrap node's first start)
#      GALERA_CLUSTER_ADDRESS  gcomm://galera-1,galera-2,galera-3
#      GALERA_NODE_NAME        this node's name in the cluster (default: hostname)
#      GALERA_SST_PASSWORD     password of the `mariabackup` user state transfers use
#      GALERA_BOOTSTRAP        yes on the one node that starts a brand-new cluster
set -euo pipefail

DATADIR=/var/lib/mysql
CNF=/etc/mysql/mariadb.conf.d/99-galera.cnf

log() { echo "orion-galera: $*" >&2; }
die() { echo "orion-galera: ERROR: $*" >&2; exit 1; }
sql_str() { local s=${1//\\/\\\\}; s=${s//\'/\\\'}; printf "'%s'" "$s"; }

cluster=${GALERA_CLUSTER_ADDRESS:?GALERA_CLUSTER_ADDRESS must be set, e.g. gcomm://galera-1,galera-2,galera-3}
node=${GALERA_NODE_NAME:-$(hostname)}
[[ -n "${GALERA_SST_PASSWORD:-}" ]] || die "GALERA_SST_PASSWORD must be set"
[[ "$cluster" == gcomm://* ]] || die "GALERA_CLUSTER_ADDRESS must start with gcomm:// (got '$cluster')"

peers=()
IFS=, read -ra members <<<"${cluster#gcomm://}"
for m in "${members[@]}"; do
  [[ "${m%%:*}" == "$node" ]] || peers+=("${m%%:*}")
done

# Whether some other member is synced in a primary component (its clustercheck on port
# 9200 answers 200). A member merely listening on its group port may be looking for a
# cluster itself: after a whole-cluster restart, every node but one does.
peer_synced() {
  local p status
  for p in "${peers[@]}"; do
    status=$(timeout 2 bash -c \
      "exec 3<>/dev/tcp/$p/9200 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && head -n1 <&3" \
      2>/dev/null) || continue
    [[ "$status" == *" 200 "* ]] && return 0
  done
  return 1
}

# Waits up to $1 seconds for a synced member.
wait_for_member() {
  local _
  for _ in $(seq "$1"); do peer_synced && return 0; sleep 1; done
  return 1
}

install -d -o mysql -g mysql -m 0755 /run/mysqld
mkdir -p "$DATADIR" && chown mysql:mysql "$DATADIR"

new_cluster=0
if [[ ! -d "$DATADIR/mysql" ]]; then
  if [[ "${GALERA_BOOTSTRAP:-no}" == yes ]] && ! peer_synced; then
    log "first start of the bootstrap node: initialising, then starting a new cluster"
    init_sql=$(mktemp)
    chmod 600 "$init_sql"
    {
      # mariadb-backup's donor side: the least a backup needs.
      echo "CREATE USER 'mariabackup'@'localhost' IDENTIFIED BY $(sql_str "$GALERA_SST_PASSWORD");"
      echo "GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO 'mariabackup'@'localhost';"
    } >"$init_sql"
    MARIADB_INIT_ONLY=1 MARIADB_INIT_SQL="$init_sql" orion-mariadb-entrypoint
    rm -f "$init_sql"
    new_cluster=1
  else
    log "empty datadir: waiting for a synced member to join (the state comes by SST)"
    wait_for_member 300 || die "no member of $cluster was synced for 300 s"
  fi
elif grep -qs '^safe_to_bootstrap: *1' "$DATADIR/grastate.dat" && ! peer_synced; then
  log "this node left the cluster last and no member is synced: starting the cluster again from it"
  new_cluster=1
else
  # After a whole-cluster stop, the node that left last starts the cluster again; the
  # others wait for it. (After a crash of every node, none may: then they try to form
  # the cluster again together from their saved view, pc.recovery.)
  log "joining $cluster"
  wait_for_member 60 || log "no synced member after 60 s: joining anyway"
fi

# The configuration carries the state-transfer password: readable by root and mysql only.
(umask 027 && cat >"$CNF") <<CNF
# Written by orion-galera-entrypoint at each start.
[galera]
wsrep_on = ON
wsrep_provider = /usr/lib/galera/libgalera_smm.so
wsrep_cluster_name = orion
wsrep_cluster_address = $cluster
wsrep_node_name = $node
wsrep_sst_method = mariabackup
wsrep_sst_auth = mariabackup:$GALERA_SST_PASSWORD
# A member that stops answering is declared gone after 3 s (Galera's default is 5 s),
# so that the survivors go on taking writes soon after a node dies. The write-set cache
# lets a node that was away for a while catch up by IST rather than a full copy. It is
# not recovered from disk at a start: a cache recovered after a whole-cluster stop can
# lack the last write set, and an IST from it fails half-way; with an empty cache the
# donor sends a full copy instead.
wsrep_provider_options = "evs.suspect_timeout=PT3S; evs.inactive_timeout=PT6S; evs.inactive_check_period=PT0.5S; evs.keepalive_period=PT0.5S; gcache.size=256M; gcache.recover=no"
# What Galera needs of every server: row-based replication, InnoDB, and interleaved
# auto-increment locks.
binlog_format = ROW
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
innodb_flush_log_at_trx_commit = 2
CNF
chgrp mysql "$CNF"

# A node that did not stop cleanly (crash, `docker kill`) does not know its position
# (grastate.dat says seqno -1): without it, it would need the whole state again (SST).
# InnoDB knows it: recover it, so that the node asks only for what it missed (IST).
start_position=()
if ((!new_cluster)) && [[ -d "$DATADIR/mysql" ]] && grep -qs '^seqno: *-1' "$DATADIR/grastate.dat"; then
  log "not stopped cleanly: recovering this node's position"
  if position=$(galera_recovery) && [[ -n "$position" ]]; then
    log "recovered ${position#--wsrep[-_]start[-_]position=}"
    start_position=("$position")
  fi
fi

# HAProxy's health check: one clustercheck per connection to port 9200.
socat TCP-LISTEN:9200,reuseaddr,fork EXEC:"/usr/local/bin/clustercheck --http" &

unset MARIADB_PASSWORD GALERA_SST_PASSWORD
args=()
((new_cluster)) && args+=(--wsrep-new-cluster)
exec mariadbd --user=mysql --datadir="$DATADIR" --socket=/run/mysqld/mysqld.sock \
  --bind-address=0.0.0.0 --port=3306 --skip-name-resolve \
  --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
  --max-connections=500 "${args[@]}" "${start_position[@]}" "$@"
