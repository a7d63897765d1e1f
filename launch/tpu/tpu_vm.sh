#!/usr/bin/env bash
# Runs starflow2 on a Cloud TPU slice (TPU VMs): create, install, run on every worker, delete.
#
#   launch/tpu/tpu_vm.sh ACTION --name NAME --zone ZONE [options] [-- STARFLOW2 ARGS...]
#
# Actions:
#   create   a TPU VM (gcloud compute tpus tpu-vm create), or with --queued / --num-slices K > 1 a
#            queued resource (gcloud compute tpus queued-resources create; K slices named NAME-0..K-1),
#            then waits until it is ACTIVE
#   setup    copy this checkout (git archive of HEAD) to every worker and install it there into
#            ~/starflow2-jax/.venv from launch/requirements.lock (which pins libtpu)
#   run      run `starflow2 STARFLOW2 ARGS... --workdir WORKDIR` on every worker of every slice at
#            once (gcloud compute tpus tpu-vm ssh --worker=all); each worker also appends its output
#            to ~/starflow2-jax/logs/<hostname>.log; the output of all workers streams here
#   delete   delete the TPU VM / the queued resource and its slices
#   all      create, setup, run, then delete (also when the run fails)
#
# Options:
#   --name NAME                 TPU VM name (multi-slice: the node prefix; slices are NAME-0, NAME-1, ...)
#   --zone ZONE                 e.g. us-east5-a
#   --project PROJECT           default: gcloud's configured project
#   --accelerator-type TYPE     create: e.g. v5p-64, v6e-64, v5litepod-16, v4-32
#   --runtime-version VERSION   create: default by generation (v5p: v2-alpha-tpuv5, v6e:
#                               v2-alpha-tpuv6e, v5litepod: v2-alpha-tpuv5-lite, v4: tpu-ubuntu2204-base)
#   --queued                    create a queued resource (waits for capacity) instead of a VM
#   --spot                      spot capacity (preemptible: the run saves and exits 0 on SIGTERM)
#   --num-slices K              K slices over DCN (a queued resource with K nodes; mesh.data % K == 0)
#   --workdir DIR               run: the run's workdir, shared by all workers (a gs:// bucket path)
#   --env KEY=VALUE             run: exported on every worker (repeatable), e.g. --env JAX_LOG_COMPILES=1
#   --dry-run                   print the exact commands instead of running them
#
# jax.distributed needs no flags on TPU VMs: every worker runs the same command with
# STARFLOW2_DISTRIBUTED=auto, and jax.distributed.initialize() reads the slice (and, multi-slice,
# the MEGASCALE_* variables the queued resource sets) from the VM.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

# shellcheck disable=SC2088  # the tilde is meant for the worker's shell, which expands it
REMOTE_DIR='~/starflow2-jax'
ARCHIVE="starflow2-jax.tar.gz"

usage() { header_usage "${BASH_SOURCE[0]}"; }

ACTION="${1:-}"
[[ -n "${ACTION}" ]] || { usage; exit 2; }
shift
case "${ACTION}" in
  create|setup|run|delete|all) ;;
  -h|--help) usage; exit 0 ;;
  *) usage; die "unknown action '${ACTION}': expected create, setup, run, delete or all" ;;
esac

NAME="" ZONE="" PROJECT="" ACCELERATOR="" RUNTIME="" QUEUED=0 SPOT=0 NUM_SLICES=1 WORKDIR=""
ENVS=()
COMMAND=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --accelerator-type) ACCELERATOR="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --runtime-version) RUNTIME="${2:?--runtime-version needs a value}"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --num-slices) NUM_SLICES="${2:?--num-slices needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --env) check_env_assignment "${2:?--env needs KEY=VALUE}"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "${NAME}" ]] || die "--name is required"
[[ -n "${ZONE}" ]] || die "--zone is required"
[[ "${NUM_SLICES}" =~ ^[1-9][0-9]*$ ]] || die "--num-slices '${NUM_SLICES}': expected a positive integer"
if (( NUM_SLICES > 1 )); then QUEUED=1; fi

GCLOUD_COMMON=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_COMMON+=("--project=${PROJECT}")

# The TPU VM names: NAME, or NAME-0 ... NAME-(K-1) for K slices.
nodes() {
  if (( NUM_SLICES > 1 )); then
    local i
    for (( i = 0; i < NUM_SLICES; i++ )); do echo "${NAME}-${i}"; done
  else
    echo "${NAME}"
  fi
}

# Sets RUNTIME to the default runtime version of accelerator type $1 (when not given).
default_runtime() {
  [[ -z "${RUNTIME}" ]] || return 0
  case "$1" in
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v5litepod-*|v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *) die "--accelerator-type '$1': no default runtime version; pass --runtime-version" ;;
  esac
}

do_create() {
  [[ -n "${ACCELERATOR}" ]] || die "create needs --accelerator-type (e.g. v5p-64)"
  default_runtime "${ACCELERATOR}"
  local spot=()
  (( SPOT )) && spot=(--spot)
  if (( QUEUED )); then
    local placement=(--node-id="${NAME}")
    (( NUM_SLICES > 1 )) && placement=(--node-count="${NUM_SLICES}" --node-prefix="${NAME}")
    run_cmd gcloud compute tpus queued-resources create "${NAME}" "${placement[@]}" \
      --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" "${spot[@]}" "${GCLOUD_COMMON[@]}"
    wait_active
  else
    run_cmd gcloud compute tpus tpu-vm create "${NAME}" --accelerator-type="${ACCELERATOR}" \
      --version="${RUNTIME}" "${spot[@]}" "${GCLOUD_COMMON[@]}"
  fi
}

# Polls the queued resource until its state is ACTIVE (every 60 s; FAILED/SUSPENDED end the script).
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "${NAME}" "${GCLOUD_COMMON[@]}"
                  --format='value(state.state)')
  if [[ "${DRY_RUN}" == 1 ]]; then
    print_cmd "${describe[@]}"
    echo "# (repeated every 60 s until it prints ACTIVE)"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    case "${state}" in
      ACTIVE) log "queued resource ${NAME} is ACTIVE"; return ;;
      FAILED|SUSPENDED|SUSPENDING) die "queued resource ${NAME} is ${state}" ;;
      *) log "queued resource ${NAME}: ${state:-unknown}, waiting for capacity"; sleep 60 ;;
    esac
  done
}

do_setup() {
  local archive_path
  archive_path="$(mktemp -d)/${ARCHIVE}"
  run_cmd git -C "${REPO_ROOT}" archive --format=tar.gz --output="${archive_path}" HEAD
  local install="mkdir -p ${REMOTE_DIR} && tar -xzf ~/${ARCHIVE} -C ${REMOTE_DIR} && cd ${REMOTE_DIR}"
  install+=" && python3 -m venv .venv && .venv/bin/pip install -q -r launch/requirements.lock"
  install+=" && .venv/bin/pip install -q --no-deps -e . && mkdir -p logs"
  local node
  while read -r node; do
    run_cmd gcloud compute tpus tpu-vm scp "${archive_path}" "${node}:~/${ARCHIVE}" --worker=all "${GCLOUD_COMMON[@]}"
    run_cmd gcloud compute tpus tpu-vm ssh "${node}" --worker=all "${GCLOUD_COMMON[@]}" --command="${install}"
  done < <(nodes)
}

# The command every worker runs: cd, exports, starflow2 ... --workdir, output appended to its log.
remote_command() {
  local cmd="cd ${REMOTE_DIR} && export STARFLOW2_DISTRIBUTED=auto"
  local assignment
  for assignment in "${ENVS[@]}"; do
    cmd+=" && export ${assignment%%=*}=$(quote_word "${assignment#*=}")"
  done
  cmd+=" && .venv/bin/starflow2 $(quote_words "${COMMAND[@]}" --workdir "${WORKDIR}")"
  # shellcheck disable=SC2016  # $(hostname) and PIPESTATUS are the worker's, not expanded here
  cmd+=' 2>&1 | tee -a logs/$(hostname).log; exit ${PIPESTATUS[0]}'
  echo "${cmd}"
}

do_run() {
  [[ ${#COMMAND[@]} -gt 0 ]] || die "run needs the starflow2 arguments after --, e.g. -- train --config configs/demo.py"
  [[ -n "${WORKDIR}" ]] || die "run needs --workdir (a path every worker shares, e.g. gs://bucket/run)"
  local cmd node pids=() status=0
  cmd="$(remote_command)"
  while read -r node; do
    if (( NUM_SLICES > 1 && ! DRY_RUN )); then  # all slices at once: the job starts only when every slice joined
      run_cmd gcloud compute tpus tpu-vm ssh "${node}" --worker=all "${GCLOUD_COMMON[@]}" --command="${cmd}" &
      pids+=("$!")
    else
      run_cmd gcloud compute tpus tpu-vm ssh "${node}" --worker=all "${GCLOUD_COMMON[@]}" --command="${cmd}" || status=$?
    fi
  done < <(nodes)
  local pid
  for pid in "${pids[@]}"; do
    wait "${pid}" || status=$?
  done
  return "${status}"
}

do_delete() {
  if (( QUEUED )); then
    run_cmd gcloud compute tpus queued-resources delete "${NAME}" --force --quiet "${GCLOUD_COMMON[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm delete "${NAME}" --quiet "${GCLOUD_COMMON[@]}"
  fi
}

case "${ACTION}" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    do_setup
    status=0
    do_run || status=$?
    do_delete
    exit "${status}"
    ;;
esac
