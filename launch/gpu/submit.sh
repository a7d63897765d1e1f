#!/usr/bin/env bash
# Submits a multi-node starflow2 run to SLURM (launch/gpu/starflow2.sbatch), one JAX process per GPU
# or per node.
#
#   launch/gpu/submit.sh --nodes N --workdir DIR [options] -- STARFLOW2 ARGS...
#
# e.g. launch/gpu/submit.sh --nodes 4 --gpus-per-node 8 --partition a100 --time 48:00:00 \
#          --workdir /shared/runs/tarflow64 -- train --config configs/tarflow.py:imagenet64
#
# Options:
#   --nodes N               nodes (required)
#   --gpus-per-node G       GPUs per node (default 8)
#   --per gpu|node          one process per GPU (default; N*G processes, one GPU each) or per node
#                           (N processes, all G GPUs each)
#   --workdir DIR           the run's workdir on a file system every node shares (required; appended
#                           to the starflow2 arguments as --workdir DIR; SLURM's output goes to
#                           DIR/logs/slurm-<jobid>.out)
#   --partition P, --time T, --account A, --qos Q, --job-name J   passed to sbatch
#   --venv DIR              the environment on the nodes (default: this checkout's .venv)
#   --port PORT             the JAX coordinator's port on the first node (default 8476)
#   --env KEY=VALUE         exported to every process (repeatable)
#   --dry-run               print the sbatch command instead of submitting
#
# SIGTERM (preemption, scancel --signal=TERM, the time limit's warning with --signal): every
# process agrees on one step, saves it, and exits 0; resubmitting the same command resumes.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

usage() { header_usage "${BASH_SOURCE[0]}"; }

NODES="" GPUS=8 PER=gpu WORKDIR="" VENV="${REPO_ROOT}/.venv" PORT=8476
SBATCH_OPTS=()
ENVS=()
COMMAND=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) GPUS="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --per) PER="${2:?--per needs gpu or node}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --partition|--time|--account|--qos|--job-name)
      SBATCH_OPTS+=("$1=${2:?$1 needs a value}"); shift 2 ;;
    --venv) VENV="${2:?--venv needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --env) check_env_assignment "${2:?--env needs KEY=VALUE}"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "${NODES}" =~ ^[1-9][0-9]*$ ]] || die "--nodes '${NODES}': expected a positive integer"
[[ "${GPUS}" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node '${GPUS}': expected a positive integer"
[[ "${PORT}" =~ ^[0-9]+$ ]] || die "--port '${PORT}': expected a port number"
[[ "${PER}" == gpu || "${PER}" == node ]] || die "--per '${PER}': expected gpu or node"
[[ -n "${WORKDIR}" ]] || die "--workdir is required (a directory every node can read and write)"
[[ ${#COMMAND[@]} -gt 0 ]] || die "the starflow2 arguments go after --, e.g. -- train --config configs/demo.py"

if [[ "${PER}" == gpu ]]; then TASKS_PER_NODE="${GPUS}"; else TASKS_PER_NODE=1; fi
EXPORTS="ALL,STARFLOW2_REPO=${REPO_ROOT},STARFLOW2_PROCESS_PER=${PER},STARFLOW2_VENV=${VENV},STARFLOW2_COORDINATOR_PORT=${PORT}"
for assignment in "${ENVS[@]}"; do
  [[ "${assignment}" != *,* ]] || die "--env '${assignment}': sbatch --export cannot carry a comma in a value"
  EXPORTS+=",${assignment}"
done

run_cmd mkdir -p "${WORKDIR}/logs"
run_cmd sbatch --nodes="${NODES}" --ntasks-per-node="${TASKS_PER_NODE}" --gpus-per-node="${GPUS}" \
  --output="${WORKDIR}/logs/slurm-%j.out" "${SBATCH_OPTS[@]}" --export="${EXPORTS}" \
  "${SCRIPT_DIR}/starflow2.sbatch" "${COMMAND[@]}" --workdir "${WORKDIR}"
