#!/usr/bin/env bash
# Orion's whole test suite, from a fresh clone: installs the tools that are missing
# (ansible-core, ssh-audit, chromium, openapi-spec-validator), builds the images that are missing (debootstrap base, sshd
# worker, MariaDB), starts MariaDB, runs the unit and integration tests against it and
# real worker containers, then cleans up.
#
#   scripts/test.sh                 everything
#   scripts/test.sh rent::          only tests whose name matches (nextest filter)
#
# Env: ORION_TEST_KEEP=1  leave MariaDB running afterwards (faster re-runs)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/docker-engine.sh

cleanup() {
  if [[ "${ORION_TEST_KEEP:-0}" != 1 ]]; then
    scripts/test-infra.sh down >/dev/null 2>&1 || true
  else
    # Workers started by tests are removed by the tests; catch any left by a crash.
    ids=$(docker ps -aq --filter label=orion.test=1)
    [[ -z "$ids" ]] || docker rm -f -v $ids >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# The Ansible executor's tests need ansible-playbook (and an ssh client) on this machine.
if ! command -v ansible-playbook >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ansible-core" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ansible-core openssh-client >/dev/null
  else
    echo "test.sh: ansible-playbook is missing and cannot be installed here (needs root and apt);" \
      "install ansible-core, or the Ansible tests will fail saying so" >&2
  fi
fi

# The worker hardening test audits a worker's sshd with ssh-audit (Debian's package).
if ! command -v ssh-audit >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ssh-audit" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ssh-audit >/dev/null
  else
    echo "test.sh: ssh-audit is missing and cannot be installed here (needs root and apt);" \
      "install ssh-audit, or the worker hardening test will fail saying so" >&2
  fi
fi

# The dashboard's browser test drives Debian's headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium and chromium-driver" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null
  else
    echo "test.sh: chromium or chromedriver is missing and cannot be installed here (needs" \
      "root and apt); install chromium and chromium-driver, or the dashboard test will fail" \
      "saying so" >&2
  fi
fi

# The OpenAPI document's test runs a standard validator (PyPI's openapi-spec-validator).
if ! python3 -c 'import openapi_spec_validator' >/dev/null 2>&1; then
  echo "test.sh: installing openapi-spec-validator (pip)" >&2
  python3 -m pip install -q openapi-spec-validator >/dev/null 2>&1 \
    || echo "test.sh: could not install openapi-spec-validator; the OpenAPI validator test will fail saying so" >&2
fi

# Exports ORION_TEST_DATABASE_URL and ORION_TEST_WORKER_IMAGE.
env_lines=$(scripts/test-infra.sh up)
while IFS= read -r line; do export "$line"; done <<<"$env_lines"

if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [[ "${CI:-}" == true ]] && profile=ci
  cargo nextest run --profile "$profile" "$@"
else
  cargo test "$@"
fi
