#!/bin/bash
# Whether this Galera node may take Orion's writes: it is in the primary component, its
# state is Synced (4) and wsrep is ready. A node that lost its quorum, or a joiner still
# receiving the state, answers no.
#
#   clustercheck          exit status 0 (yes) or 1 (no): the container's health check
#   clustercheck --http   the same as an HTTP answer, 200 or 503, for HAProxy's check
#                         (run per connection by socat on port 9200)
#
# Reads the server's status as root over the unix socket (root@localhost may log in by
# socket): no password is needed or shown.
set -uo pipefail

status=$(timeout 2 mariadb --protocol=socket -uroot -N -B -e \
  "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
   WHERE VARIABLE_NAME IN ('wsrep_cluster_status', 'wsrep_local_state', 'wsrep_ready')
   ORDER BY VARIABLE_NAME" 2>/dev/null | tr '\n' ' ')

if [[ "$status" == "Primary 4 ON " ]]; then
  ok=1 body="synced and primary"
else
  ok=0 body="not ready to take writes: ${status:-server not answering}"
fi

if [[ "${1:-}" == --http ]]; then
  # Read the request's head first, so that closing does not reset the connection.
  while IFS= read -r -t 1 line; do
    [[ "$line" == $'\r' || -z "$line" ]] && break
  done
  if ((ok)); then code="200 OK"; else code="503 Service Unavailable"; fi
  printf 'HTTP/1.1 %s\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s\n' \
    "$code" "$((${#body} + 1))" "$body"
fi
((ok))
