#!/usr/bin/env bash
# Runs starflow2 on TPU slices of a GKE cluster as an xpk workload (JobSet), restarted on failure.
#
#   launch/tpu/xpk.sh ACTION --cluster CLUSTER --workload NAME [options] [-- STARFLOW2 ARGS...]
#
# Actions:
#   build    build the image from this checkout (launch/tpu/Dockerfile: Python 3.11, the pinned
#            environment of launch/requirements.lock incl. libtpu, the code in /app) and push it
#   create   xpk workload create: the same command on every VM of every slice
#            (`starflow2 STARFLOW2 ARGS... --workdir WORKDIR` in /app), restarted up to
#            --max-restarts times; after a restart the run resumes from WORKDIR's latest checkpoint
#            (a `train` that SIGTERM stopped exits 143 after saving, so preemption counts as a failure)
#   logs     stream the output of every pod (kubectl logs -f over the JobSet's pods)
#   list     xpk workload list
#   delete   xpk workload delete
#
# Options:
#   --cluster CLUSTER          the GKE cluster (made with `xpk cluster create`)
#   --workload NAME            the workload (JobSet) name
#   --project PROJECT, --zone ZONE   passed to xpk / gcloud (default: gcloud's configuration)
#   --tpu-type TYPE            create: e.g. v5p-64, v6e-64
#   --num-slices K             create: K slices (multi-slice over DCN; mesh.data % K == 0), default 1
#   --docker-image IMAGE       build / create: the image (e.g. us-docker.pkg.dev/PROJECT/REPO/starflow2:TAG)
#   --max-restarts N           create: JobSet restarts on failure (default 10)
#   --workdir DIR              create: the run's workdir (a gs:// bucket path every pod shares)
#   --env KEY=VALUE            create: exported in every pod (repeatable)
#   --dry-run                  print the exact commands instead of running them
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO_ROOT}/launch/common.sh"

usage() { header_usage "${BASH_SOURCE[0]}"; }

ACTION="${1:-}"
[[ -n "${ACTION}" ]] || { usage; exit 2; }
shift
case "${ACTION}" in
  build|create|logs|list|delete) ;;
  -h|--help) usage; exit 0 ;;
  *) usage; die "unknown action '${ACTION}': expected build, create, logs, list or delete" ;;
esac

CLUSTER="" WORKLOAD="" PROJECT="" ZONE="" TPU_TYPE="" NUM_SLICES=1 IMAGE="" MAX_RESTARTS=10 WORKDIR=""
ENVS=()
COMMAND=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) CLUSTER="${2:?--cluster needs a value}"; shift 2 ;;
    --workload) WORKLOAD="${2:?--workload needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --tpu-type) TPU_TYPE="${2:?--tpu-type needs a value}"; shift 2 ;;
    --num-slices) NUM_SLICES="${2:?--num-slices needs a value}"; shift 2 ;;
    --docker-image) IMAGE="${2:?--docker-image needs a value}"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --env) check_env_assignment "${2:?--env needs KEY=VALUE}"; ENVS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "${NUM_SLICES}" =~ ^[1-9][0-9]*$ ]] || die "--num-slices '${NUM_SLICES}': expected a positive integer"
[[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "--max-restarts '${MAX_RESTARTS}': expected an integer >= 0"
XPK_COMMON=()
[[ -z "${PROJECT}" ]] || XPK_COMMON+=("--project=${PROJECT}")
[[ -z "${ZONE}" ]] || XPK_COMMON+=("--zone=${ZONE}")

need() { [[ -n "$2" ]] || die "${ACTION} needs $1"; }

# The command every pod runs: cd /app, exports, starflow2 ... --workdir. A preempted `train` saves
# its step and would exit 0, which a JobSet takes for "finished"; it exits PREEMPTED_EXIT_CODE
# instead (128 + SIGTERM), so the JobSet restarts it (counted against --max-restarts) and it resumes.
PREEMPTED_EXIT_CODE=143
pod_command() {
  local cmd="cd /app && export STARFLOW2_DISTRIBUTED=auto" assignment extra=()
  for assignment in "${ENVS[@]}"; do
    cmd+=" && export ${assignment%%=*}=$(quote_word "${assignment#*=}")"
  done
  [[ "${COMMAND[0]}" != "train" ]] || extra=(--preempted-exit-code "${PREEMPTED_EXIT_CODE}")
  echo "${cmd} && starflow2 $(quote_words "${COMMAND[@]}" "${extra[@]}" --workdir "${WORKDIR}")"
}

case "${ACTION}" in
  build)
    need --docker-image "${IMAGE}"
    run_cmd docker build -f "${REPO_ROOT}/launch/tpu/Dockerfile" -t "${IMAGE}" "${REPO_ROOT}"
    run_cmd docker push "${IMAGE}"
    ;;
  create)
    need --cluster "${CLUSTER}"; need --workload "${WORKLOAD}"; need --tpu-type "${TPU_TYPE}"
    need --docker-image "${IMAGE}"; need "--workdir (a gs:// path every pod shares)" "${WORKDIR}"
    [[ ${#COMMAND[@]} -gt 0 ]] || die "create needs the starflow2 arguments after --, e.g. -- train --config FILE"
    run_cmd xpk workload create --cluster="${CLUSTER}" --workload="${WORKLOAD}" --tpu-type="${TPU_TYPE}" \
      --num-slices="${NUM_SLICES}" --docker-image="${IMAGE}" --max-restarts="${MAX_RESTARTS}" \
      "${XPK_COMMON[@]}" --command="$(pod_command)"
    ;;
  logs)
    need --cluster "${CLUSTER}"; need --workload "${WORKLOAD}"
    location=()
    [[ -z "${ZONE}" ]] || location+=("--location=${ZONE%-*}")
    [[ -z "${PROJECT}" ]] || location+=("--project=${PROJECT}")
    run_cmd gcloud container clusters get-credentials "${CLUSTER}" "${location[@]}"
    run_cmd kubectl logs -f --all-containers --prefix --max-log-requests=1000 \
      --selector="jobset.sigs.k8s.io/jobset-name=${WORKLOAD}"
    ;;
  list)
    need --cluster "${CLUSTER}"
    run_cmd xpk workload list --cluster="${CLUSTER}" "${XPK_COMMON[@]}"
    ;;
  delete)
    need --cluster "${CLUSTER}"; need --workload "${WORKLOAD}"
    run_cmd xpk workload delete --cluster="${CLUSTER}" --workload="${WORKLOAD}" "${XPK_COMMON[@]}"
    ;;
esac
