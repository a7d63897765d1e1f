#!/usr/bin/env bash
# Local entry point for starflow2-jax: builds the pinned environment and runs things in it.
#
#   launch/local.sh test [pytest args...]   create/refresh .venv from launch/requirements.lock,
#                                           then run the test suite on 8 fake CPU devices
#
# Environment:
#   STARFLOW2_PYTEST_WORKERS   pytest-xdist worker count (default 2; 0 runs in-process)
#   STARFLOW2_PYTHON           interpreter used to create .venv (default: python3.11, else python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv"
LOCK="${REPO_ROOT}/launch/requirements.lock"
STAMP="${VENV}/.starflow2-lock.sha256"

log() { echo "[local.sh] $*" >&2; }
die() { echo "[local.sh] error: $*" >&2; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh <command> [args...]

commands:
  test [pytest args...]   set up .venv from launch/requirements.lock (if missing or stale) and
                          run the test suite (default: tests, -n $STARFLOW2_PYTEST_WORKERS or 2)
EOF
}

# Prints the interpreter to build the venv with; the lock file is for Python 3.11 only.
find_python() {
  local candidate
  for candidate in "${STARFLOW2_PYTHON:-}" python3.11 python3; do
    [[ -n "${candidate}" ]] || continue
    command -v "${candidate}" >/dev/null 2>&1 || continue
    if "${candidate}" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
        >/dev/null 2>&1; then
      echo "${candidate}"
      return 0
    fi
  done
  die "Python 3.11 is required (launch/requirements.lock is pinned for it), but neither" \
      "python3.11 nor a python3 of version 3.11 was found on PATH; set STARFLOW2_PYTHON."
}

# sha256 over everything that decides the venv's contents.
lock_hash() {
  cat "${LOCK}" "${REPO_ROOT}/setup.cfg" | sha256sum | cut -d' ' -f1
}

# Creates or refreshes .venv; a no-op (one hash comparison) when the stamp matches.
ensure_venv() {
  [[ -f "${LOCK}" ]] || die "missing ${LOCK}"
  local want
  want="$(lock_hash)"
  if [[ -x "${VENV}/bin/python" && -f "${STAMP}" && "$(cat "${STAMP}")" == "${want}" ]]; then
    return 0
  fi
  if [[ ! -x "${VENV}/bin/python" ]] || \
      ! "${VENV}/bin/python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    local python
    python="$(find_python)"
    log "creating ${VENV} with $("${python}" --version 2>&1)"
    rm -rf "${VENV}"
    "${python}" -m venv "${VENV}"
  else
    log "${VENV} is stale (lock file or setup.cfg changed); reinstalling"
  fi
  rm -f "${STAMP}"  # a failed install below must not leave a valid-looking stamp
  "${VENV}/bin/python" -m pip install --quiet -r "${LOCK}"
  "${VENV}/bin/python" -m pip install --quiet --no-deps -e "${REPO_ROOT}"
  echo "${want}" > "${STAMP}"
  log "environment ready (stamp ${want:0:12})"
}

cmd_test() {
  ensure_venv
  local workers="${STARFLOW2_PYTEST_WORKERS:-2}"
  local args=()
  if (( $# == 0 )); then
    args=(tests)
  fi
  cd "${REPO_ROOT}"
  local rc=0
  "${VENV}/bin/python" -m pytest -n "${workers}" -q "${args[@]}" "$@" || rc=$?
  if (( rc == 5 )); then
    die "pytest collected no tests (exit 5); a test run that tests nothing is a failure"
  fi
  return "${rc}"
}

main() {
  local command="${1:-}"
  (( $# > 0 )) && shift
  case "${command}" in
    test) cmd_test "$@" ;;
    -h|--help|help) usage; exit 0 ;;
    *)
      [[ -n "${command}" ]] && echo "[local.sh] unknown command: ${command}" >&2
      usage
      exit 2
      ;;
  esac
}

main "$@"
