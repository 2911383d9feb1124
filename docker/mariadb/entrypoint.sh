#!/bin/bash
# Orion MariaDB entrypoint: initialise an empty datadir once (root password,
# optional database/user), then run mariadbd in the foreground as PID 1.
#
# Env: MARIADB_ROOT_PASSWORD (required), MARIADB_DATABASE, MARIADB_USER,
#      MARIADB_PASSWORD (optional; user gets all privileges on the database).
#      MARIADB_INIT_SQL   a file of more SQL run once at initialisation (the Galera
#                         image's replication users)
#      MARIADB_INIT_ONLY=1  initialise if needed, then exit instead of serving (the
#                         Galera image starts the server itself, with wsrep)
set -euo pipefail

DATADIR=/var/lib/mysql
SOCKET=/run/mysqld/mysqld.sock

log() { echo "orion-mariadb: $*" >&2; }
die() { echo "orion-mariadb: ERROR: $*" >&2; exit 1; }

# SQL string literal / identifier quoting for values taken from the env.
sql_str() { local s=${1//\\/\\\\}; s=${s//\'/\\\'}; printf "'%s'" "$s"; }
# shellcheck disable=SC2016  # literal backticks
sql_id()  { printf '`%s`' "${1//\`/\`\`}"; }

[[ -n "${MARIADB_ROOT_PASSWORD:-}" ]] || die "MARIADB_ROOT_PASSWORD must be set (e.g. docker run -e MARIADB_ROOT_PASSWORD=...)"
if [[ -n "${MARIADB_USER:-}" && -z "${MARIADB_PASSWORD:-}" ]]; then
  die "MARIADB_USER is set but MARIADB_PASSWORD is not"
fi
if [[ "${MARIADB_USER:-}" == root ]]; then
  die "MARIADB_USER must not be root (root is configured by MARIADB_ROOT_PASSWORD)"
fi

# /run is a fresh tmpfs-like dir per start; volumes and bind mounts may come
# with foreign ownership.
install -d -o mysql -g mysql -m 0755 /run/mysqld
mkdir -p "$DATADIR"
chown mysql:mysql "$DATADIR"

if [[ ! -d "$DATADIR/mysql" ]]; then
  # Not initialised ("mysql" schema missing). Refuse to scribble over
  # unrelated content, but tolerate a filesystem's lost+found.
  if [[ -n "$(find "$DATADIR" -mindepth 1 -maxdepth 1 ! -name lost+found -print -quit)" ]]; then
    die "$DATADIR is not empty but has no 'mysql' schema (half-initialised?); remove the volume to start over"
  fi
  log "initialising $DATADIR"
  mariadb-install-db --user=mysql --datadir="$DATADIR" --skip-test-db \
    --auth-root-authentication-method=socket --skip-name-resolve >/dev/null

  # Temporary server: socket only, so nothing outside sees a half-set-up
  # database and the TCP healthcheck stays red until the real start.
  mariadbd --user=mysql --datadir="$DATADIR" --socket="$SOCKET" \
    --skip-networking --skip-log-bin --skip-slave-start &
  pid=$!
  for _ in $(seq 60); do
    mariadb-admin --socket="$SOCKET" -uroot ping >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || die "temporary mariadbd exited during initialisation"
    sleep 0.5
  done
  mariadb-admin --socket="$SOCKET" -uroot ping >/dev/null 2>&1 || die "temporary mariadbd did not come up"

  pw=$(sql_str "$MARIADB_ROOT_PASSWORD")
  {
    # Only root@localhost and the system accounts survive (install-db also
    # creates root@<hostname>, root@127.0.0.1, root@::1, anonymous users).
    echo "DELETE FROM mysql.global_priv WHERE user NOT IN ('root', 'mariadb.sys', 'mysql') OR (user = 'root' AND host <> 'localhost');"
    echo "DELETE FROM mysql.proxies_priv WHERE host NOT IN ('localhost', '%');"
    echo "FLUSH PRIVILEGES;"
    # root@localhost: password, or unix socket as OS root (docker exec).
    echo "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD($pw) OR unix_socket;"
    echo "CREATE USER 'root'@'%' IDENTIFIED BY $pw;"
    echo "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;"
    echo "GRANT PROXY ON ''@'%' TO 'root'@'%' WITH GRANT OPTION;"
    if [[ -n "${MARIADB_DATABASE:-}" ]]; then
      echo "CREATE DATABASE IF NOT EXISTS $(sql_id "$MARIADB_DATABASE");"
    fi
    if [[ -n "${MARIADB_USER:-}" ]]; then
      echo "CREATE USER $(sql_str "$MARIADB_USER")@'%' IDENTIFIED BY $(sql_str "$MARIADB_PASSWORD");"
      if [[ -n "${MARIADB_DATABASE:-}" ]]; then
        echo "GRANT ALL PRIVILEGES ON $(sql_id "$MARIADB_DATABASE").* TO $(sql_str "$MARIADB_USER")@'%';"
      fi
    fi
    echo "FLUSH PRIVILEGES;"
    if [[ -n "${MARIADB_INIT_SQL:-}" ]]; then
      cat "$MARIADB_INIT_SQL"
    fi
  } | mariadb --protocol=socket --socket="$SOCKET" -uroot --binary-mode \
    || { kill "$pid"; wait "$pid" || true; die "initialisation SQL failed"; }

  # Clean shutdown (SIGTERM), then wait so InnoDB is flushed before the real start.
  kill -TERM "$pid"
  wait "$pid" || true
  log "initialisation done"
fi

[[ "${MARIADB_INIT_ONLY:-0}" == 1 ]] && exit 0
unset MARIADB_PASSWORD
# The root password stays in the env on purpose: the HEALTHCHECK reads it.
exec mariadbd --user=mysql --datadir="$DATADIR" --socket="$SOCKET" \
  --bind-address=0.0.0.0 --port=3306 --skip-name-resolve \
  --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
  --max-connections=500 "$@"
