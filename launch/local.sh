#!/usr/bin/env bash
# Local entry point for starflow2-jax: builds the pinned environment and runs things in it.
#
#   launch/local.sh test [pytest args...]   create/refresh .venv from launch/requirements.lock,
#                                           then run the test suite on 8 fake CPU devices
#   launch/local.sh demo [--workdir DIR]     the same .venv, then the digits demo: build the data,
#                                           train configs/demo.py (resuming from DIR), sample,
#                                           score, write DIR/report.html (default DIR: runs/demo)
#
# Environment:
#   STARFLOW2_PYTEST_WORKERS   pytest-xdist worker count (default 2; 0 runs in-process)
#   STARFLOW2_DEMO_CONFIG      the demo's config (default configs/demo.py; the tests use
#                              configs/demo.py:runlocal, a few steps of a tiny model)
#   STARFLOW2_PYTHON           interpreter used to create .venv (default: python3.11, else python3)
#   JAX_PLATFORMS              left as set; when unset and the machine shows no TPU (/dev/accel*,
#                              /dev/vfio/N) and no NVIDIA GPU (nvidia-smi), set to "cpu", so the pinned
#                              libtpu (there for `starflow2 aot`) does not probe for a TPU, and print an
#                              error about it, at every start
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv"
LOCK="${REPO_ROOT}/launch/requirements.lock"
STAMP="${VENV}/.starflow2-lock.sha256"

if [[ -z "${JAX_PLATFORMS+set}" ]] && ! compgen -G "/dev/accel*" > /dev/null \
    && ! compgen -G "/dev/vfio/[0-9]*" > /dev/null && ! command -v nvidia-smi > /dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi

log() { echo "[local.sh] $*" >&2; }
die() { echo "[local.sh] error: $*" >&2; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh <command> [args...]

commands:
  test [pytest args...]   set up .venv from launch/requirements.lock (if missing or stale) and
                          run the test suite (default: tests, -n $STARFLOW2_PYTEST_WORKERS or 2)
  demo [--workdir DIR]    set up .venv, then train the digits demo (configs/demo.py) in DIR
                          (default runs/demo; an existing checkpoint there is resumed), sample it,
                          measure held-out bits/dim, judge the samples and write DIR/report.html
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
  if (( workers > 0 )); then
    args+=(--dist loadgroup)  # tests sharing an expensive session fixture (xdist_group) run in one worker
  fi
  if (( $# == 0 )); then
    args+=(tests)
  fi
  cd "${REPO_ROOT}"
  local rc=0
  "${VENV}/bin/python" -m pytest -n "${workers}" -q "${args[@]}" "$@" || rc=$?
  if (( rc == 5 )); then
    die "pytest collected no tests (exit 5); a test run that tests nothing is a failure"
  fi
  return "${rc}"
}

# Seconds since the epoch, with a fraction.
now() { date +%s.%N; }

# Seconds elapsed since $1 (a `now` value), one decimal.
since() { awk -v t0="$1" -v t1="$(now)" 'BEGIN { printf "%.1f", t1 - t0 }'; }

# True when $1 (a checkpoint root) holds a complete Orbax step directory.
has_checkpoint() {
  local step
  for step in "$1"/[0-9]*; do
    [[ "$(basename "${step}")" =~ ^[0-9]+$ && -f "${step}/_CHECKPOINT_METADATA" ]] && return 0
  done
  return 1
}

DEMO_TIMES=()

# demo_step NAME CMD...: runs CMD, dies naming the step when it fails, records its wall time.
demo_step() {
  local name="$1"
  shift
  local t0 rc=0
  t0="$(now)"
  log "demo: ${name}"
  "$@" || rc=$?
  (( rc == 0 )) || die "demo step '${name}' failed (exit ${rc}): $*"
  DEMO_TIMES+=(--time "${name}=$(since "${t0}")")
}

# build_demo_data WORKDIR CONFIG: builds the digits dataset where CONFIG's training reads it
# (<workdir>/tfds unless the config sets data.data_dir).
build_demo_data() {
  "${VENV}/bin/python" - "$1" "$2" <<'PY'
import contextlib
import io
import sys

from starflow2_jax.cli.common import setup_logging
from starflow2_jax.config_files import load_config
from starflow2_jax.data import build_digits
from starflow2_jax.train.inputs import data_dir

setup_logging()  # no TFDS progress bars
with contextlib.redirect_stdout(io.StringIO()):  # nor TFDS's "Downloading and preparing" banner
    builder = build_digits(data_dir(load_config(sys.argv[2]), sys.argv[1]))
splits = ", ".join(f"{name} {split.num_examples}" for name, split in sorted(builder.info.splits.items()))
print(f"[local.sh] digits dataset: {builder.data_dir} ({splits})", file=sys.stderr)
PY
}

# train_demo WORKDIR CONFIG: trains (or resumes); fails when the run stopped before its last step
# (e.g. SIGTERM).
train_demo() {
  local workdir="$1" rc=0
  local summary="${workdir}/train_summary.json"
  # Written beside the target and renamed, so a failed run leaves no partial summary (nor a temporary).
  "${VENV}/bin/starflow2" train --config "$2" --workdir "${workdir}" > "${summary}.partial" || rc=$?
  if (( rc != 0 )); then
    rm -f "${summary}.partial"
    return "${rc}"
  fi
  mv -f "${summary}.partial" "${summary}"
  "${VENV}/bin/python" - "${summary}" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    summary = json.load(f)
if summary["interrupted"]:
    sys.exit(f"[local.sh] training stopped early at step {summary['step']}; rerun the demo to resume")
PY
}

cmd_demo() {
  local workdir="${REPO_ROOT}/runs/demo"
  while (( $# > 0 )); do
    case "$1" in
      --workdir)
        (( $# >= 2 )) || die "demo: --workdir needs a directory"
        workdir="$2"
        shift 2
        ;;
      --workdir=*) workdir="${1#--workdir=}"; shift ;;
      -h|--help) usage; return 0 ;;
      *) die "demo: unknown argument '$1' (usage: launch/local.sh demo [--workdir DIR])" ;;
    esac
  done
  local t_start
  t_start="$(now)"
  DEMO_TIMES=()
  demo_step setup ensure_venv
  mkdir -p "${workdir}"
  workdir="$(cd "${workdir}" && pwd)"
  cd "${REPO_ROOT}"  # configs/demo.py
  local sf="${VENV}/bin/starflow2" config="${STARFLOW2_DEMO_CONFIG:-configs/demo.py}" resumed=()
  if has_checkpoint "${workdir}/checkpoints"; then
    resumed=(--resumed)
    log "demo: ${workdir} has a checkpoint; training resumes from it"
  fi

  demo_step data build_demo_data "${workdir}" "${config}"
  demo_step train train_demo "${workdir}" "${config}"
  local g
  # The pictures: 10 samples per digit without and with guidance.
  for g in 0 2; do
    demo_step "sample_cfg${g}" "${sf}" sample --workdir "${workdir}" --guidance "${g}" --num 10 --seed 0 \
      --out "${workdir}/samples_cfg${g}.png" > /dev/null
  done
  # What the classifier judges: 100 further samples per digit at guidance 0, 1 and 2.
  for g in 0 1 2; do
    demo_step "judged_cfg${g}" "${sf}" sample --workdir "${workdir}" --guidance "${g}" --num 100 --seed 1 \
      --out "${workdir}/judged/samples_cfg${g}.png" > /dev/null
  done
  demo_step bpd "${sf}" eval bpd --workdir "${workdir}" --out "${workdir}/bpd.json" > /dev/null
  echo
  demo_step score "${VENV}/bin/python" -m starflow2_jax.eval.demo --workdir "${workdir}" "${DEMO_TIMES[@]}" \
    "${resumed[@]}"
  cat <<EOF

demo finished in $(since "${t_start}") s (wall time)
  report        ${workdir}/report.html
  metrics       ${workdir}/demo_metrics.json
  samples       ${workdir}/samples_cfg0.png, samples_cfg2.png (guidance 0 / 2; .npz: samples + labels)
  judged        ${workdir}/judged/samples_cfg{0,1,2}.npz (100 per digit)
  bits/dim      ${workdir}/bpd.json
  training      ${workdir}/metrics.jsonl, ${workdir}/checkpoints/
EOF
}

main() {
  local command="${1:-}"
  (( $# > 0 )) && shift
  case "${command}" in
    test) cmd_test "$@" ;;
    demo) cmd_demo "$@" ;;
    -h|--help|help) usage; exit 0 ;;
    *)
      [[ -n "${command}" ]] && echo "[local.sh] unknown command: ${command}" >&2
      usage
      exit 2
      ;;
  esac
}

main "$@"
