#!/usr/bin/env bash
# Orion's benchmarks on the local Docker setup: builds what is missing, starts MariaDB,
# runs `orion-bench` (release build) with the given arguments, cleans up.
#
#   scripts/bench.sh failover --runs 10     the stop-the-worker drill, 10 times
#
# Env: ORION_TEST_KEEP=1  leave MariaDB running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

cleanup() {
  [[ "${ORION_TEST_KEEP:-0}" == 1 ]] || scripts/test-infra.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
env_lines=$(scripts/test-infra.sh up)
while IFS= read -r line; do export "$line"; done <<<"$env_lines"
# The orion binary as shipped; orion-bench with the test harness (feature `testkit`).
cargo build --release --quiet --bin orion
cargo build --release --quiet --features testkit --bin orion-bench
target/release/orion-bench "$@"
