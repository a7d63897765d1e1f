#!/usr/bin/env bash
# Local entry point for starflow2-jax: builds the pinned environment and runs things in it.
#
#   launch/local.sh test [pytest args...]   create/refresh .venv from launch/requirements.lock,
#                                           then run the test suite on 8 fake CPU devices
#   launch/local.sh demo [--workdir DIR]     the same .venv, then the STARFlow2 digits demo in DIR
#                                           (default runs/demo; a demo stopped there resumes): stage 0
#                                           (configs/lm.py:demo, the "pretrained VLM", exported with
#                                           `starflow2 convert to-hf`), stages 1–3
#                                           (configs/starflow2.py:demo,stageN, each from the previous
#                                           one), then scoring (starflow2_jax.eval.starflow2_demo) into
#                                           DIR/report.html and DIR/demo_metrics.json
#   launch/local.sh demo --flow [--workdir DIR]   the flow-only digits demo: build the data, train
#                                           configs/demo.py (resuming from DIR), sample, score, write
#                                           DIR/report.html (default DIR: runs/demo_flow)
#
# The STARFlow2 demo's DIR: demo.json (its manifest: kind, size, configs; written first, into a new or
# empty DIR; a DIR holding anything else — another kind of run, a demo of another size, stray files — is
# refused before anything is written), data/ (the digits' TFDS files, shared by stages 1–3), stage0/
# and stage0_hf/ (its export), stage1/ … stage3/ (each a `starflow2 train` workdir, with
# train_summary.json once it ran all its steps: what `starflow2 train` printed plus wall_seconds),
# scoring/, report.html, demo_metrics.json. A rerun skips every finished stage (and the export when it
# exists), resumes a stopped one from its checkpoint, and scores again. SIGTERM or Ctrl-C reaches the
# running command (`starflow2 train` saves its step); local.sh then exits 143 (130) naming the stage.
#
# Environment:
#   STARFLOW2_PYTEST_WORKERS   pytest-xdist worker count (default 2; 0 runs in-process)
#   STARFLOW2_DEMO_SIZE        the STARFlow2 demo's size: demo (default) or runlocal (the configs'
#                              ,runlocal presets: a few steps per stage, a few samples per score; tests)
#   STARFLOW2_DEMO_STOP_AFTER  stage0|stage1|stage2|stage3: stop after that stage (stage0: after its
#                              export), without scoring; a later run without it goes on from there
#   STARFLOW2_DEMO_TRAIN_ARGS  extra arguments for every stage's `starflow2 train` (split at spaces),
#                              e.g. --verbose or --config.train.steps=N (a run-length field may change
#                              between runs; the stored run's other fields may not)
#   STARFLOW2_DEMO_CONFIG      the flow-only demo's config (default configs/demo.py; the tests use
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
  demo [--workdir DIR]    set up .venv, then the STARFlow2 digits demo in DIR (default runs/demo;
                          a stopped demo there resumes, finished stages are skipped): stage 0 (a tiny
                          Qwen2.5-VL LM on the demo text, exported as a Hugging Face checkpoint),
                          stages 1-3 (configs/starflow2.py:demo,stageN), then scoring into
                          DIR/report.html and DIR/demo_metrics.json ($STARFLOW2_DEMO_SIZE: demo or
                          runlocal)
  demo --flow [--workdir DIR]
                          the flow-only digits demo: train configs/demo.py in DIR (default
                          runs/demo_flow; an existing checkpoint there is resumed), sample it, measure
                          held-out bits/dim, judge the samples and write DIR/report.html
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

# demo_flow WORKDIR: the flow-only digits demo (configs/demo.py or $STARFLOW2_DEMO_CONFIG) in WORKDIR.
demo_flow() {
  local workdir="$1"
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
  cat <<EOT

demo finished in $(since "${t_start}") s (wall time)
  report        ${workdir}/report.html
  metrics       ${workdir}/demo_metrics.json
  samples       ${workdir}/samples_cfg0.png, samples_cfg2.png (guidance 0 / 2; .npz: samples + labels)
  judged        ${workdir}/judged/samples_cfg{0,1,2}.npz (100 per digit)
  bits/dim      ${workdir}/bpd.json
  training      ${workdir}/metrics.jsonl, ${workdir}/checkpoints/
EOT
}

# ---- the STARFlow2 digits demo: stage 0 (lm) → to-hf → stages 1–3 → scoring ---------------------

DEMO_STAGES=(stage0 stage1 stage2 stage3)
DEMO_CHILD=""   # the pid of the command run_child is waiting for
DEMO_SIGNAL=""  # TERM or INT once local.sh received one

# A signal to local.sh: forwarded as SIGTERM to the running command (`starflow2 train` saves its step
# and exits; a command started in the background of a script ignores SIGINT, so Ctrl-C is forwarded
# as SIGTERM too); local.sh stops once that command has returned.
on_demo_signal() {
  DEMO_SIGNAL="$1"
  if [[ -n "${DEMO_CHILD}" ]]; then
    kill -TERM "${DEMO_CHILD}" 2>/dev/null || true
  fi
}

# run_child CMD...: runs CMD in the background and waits for it, so that a trapped signal reaches it
# (bash runs a trap only after a foreground command returns); returns CMD's exit status.
run_child() {
  "$@" &
  DEMO_CHILD=$!
  if [[ -n "${DEMO_SIGNAL}" ]]; then  # the signal came before DEMO_CHILD was set
    kill -TERM "${DEMO_CHILD}" 2>/dev/null || true
  fi
  local rc=0
  wait "${DEMO_CHILD}" || rc=$?
  while kill -0 "${DEMO_CHILD}" 2>/dev/null; do  # `wait` returned for the trap; CMD is still running
    rc=0
    wait "${DEMO_CHILD}" || rc=$?
  done
  DEMO_CHILD=""
  return "${rc}"
}

# demo_stopped WHAT: exits 128 + the signal's number when local.sh received a signal, naming WHAT
# (a stage) as stopped and saying that rerunning resumes it.
demo_stopped() {
  [[ -n "${DEMO_SIGNAL}" ]] || return 0
  local code=143
  [[ "${DEMO_SIGNAL}" == INT ]] && code=130
  echo "[local.sh] demo: stopped by SIG${DEMO_SIGNAL} in ${1}; run the same command again to resume" \
       "(finished stages are skipped, ${1} continues from its last checkpoint)" >&2
  exit "${code}"
}

# demo_manifest WORKDIR SIZE STAGE0_CONFIG STAGE1_CONFIG STAGE2_CONFIG STAGE3_CONFIG: checks WORKDIR
# before anything is written: new or empty → writes WORKDIR/demo.json (atomically) and prints "new";
# holding the demo.json of a STARFlow2 digits demo of SIZE → prints "resume"; anything else → exits 2
# with an error naming WORKDIR and what it holds, writing nothing.
demo_manifest() {
  "${VENV}/bin/python" - "$@" <<'PY'
import datetime
import json
import os
import sys

from starflow2_jax.atomic import write_json

workdir, size, *configs = sys.argv[1:]
KIND = "starflow2-digits-demo"
STAGES = ("stage0", "stage1", "stage2", "stage3")


def refuse(found: str, hint: str = "") -> None:
    print(f"[local.sh] error: demo --workdir {workdir}: {found}; expected a new or empty directory, or a "
          f"STARFlow2 digits demo of size {size!r} to resume (its demo.json). Nothing was written"
          f"{'; ' + hint if hint else ''}.", file=sys.stderr)
    sys.exit(2)


def describe_run(entries: list[str]) -> str:
    """What a directory without a demo.json holds, in words."""
    family = ""
    if "config.json" in entries:
        try:
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                family = json.load(f)["model"]["family"]
        except (OSError, ValueError, KeyError, TypeError):
            family = "?"
    if "bpd.json" in entries or any(e.startswith("samples_cfg") for e in entries):
        return "it holds a flow-only digits demo (bpd.json, samples_cfg*)"
    if family or "checkpoints" in entries or "metrics.jsonl" in entries:
        return (f"it holds a `starflow2 train` run" + (f" of model.family {family!r}" if family else "")
                + " (" + ", ".join(e for e in ("config.json", "checkpoints", "metrics.jsonl") if e in entries) + ")")
    shown = ", ".join(sorted(entries)[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return f"it holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} and no demo.json ({shown})"


if os.path.lexists(workdir) and not os.path.isdir(workdir):
    refuse("it exists and is not a directory")
entries = os.listdir(workdir) if os.path.isdir(workdir) else []
if not entries:
    manifest = {"kind": KIND, "size": size, "configs": dict(zip(STAGES, configs)),
                "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_json(os.path.join(workdir, "demo.json"), manifest)
    print("new")
    sys.exit(0)
if "demo.json" not in entries:
    found = describe_run(entries)
    flow = found.startswith("it holds a flow-only")
    refuse(found, "resume it with `launch/local.sh demo --flow --workdir DIR`, or pick another --workdir" if flow
           else "pick another --workdir")
try:
    with open(os.path.join(workdir, "demo.json"), encoding="utf-8") as f:
        manifest = json.load(f)
except (OSError, ValueError) as error:
    refuse(f"its demo.json is not readable JSON ({error})")
if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    refuse(f"its demo.json is of kind {kind!r}, not {KIND!r}", "pick another --workdir")
if manifest.get("size") != size:
    refuse(f"it holds a STARFlow2 digits demo of size {manifest.get('size')!r} (demo.json), not {size!r}",
           f"set STARFLOW2_DEMO_SIZE={manifest.get('size')} to resume it, or pick another --workdir")
print("resume")
PY
}

# stage_done SUMMARY: true when SUMMARY (a stage's train_summary.json) says the stage ran all its
# steps; prints "<step> <wall seconds>" then.
stage_done() {
  [[ -f "$1" ]] || return 1
  "${VENV}/bin/python" - "$1" <<'PY'
import json
import sys

try:
    with open(sys.argv[1], encoding="utf-8") as f:
        summary = json.load(f)
    done = not summary["interrupted"]
    print(int(summary["step"]), float(summary.get("wall_seconds", 0.0)))
except (OSError, ValueError, KeyError, TypeError):
    done = False
sys.exit(0 if done else 1)
PY
}

# finish_summary PARTIAL SUMMARY SECONDS: PARTIAL (what `starflow2 train` printed) plus wall_seconds
# becomes SUMMARY (atomically) when the run finished its steps; exits 3 naming the step when SIGTERM
# stopped it first. PARTIAL is removed either way.
finish_summary() {
  "${VENV}/bin/python" - "$@" <<'PY'
import json
import os
import sys

from starflow2_jax.atomic import write_json

partial, target, seconds = sys.argv[1:]
try:
    with open(partial, encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    summary = json.loads(lines[-1])
    summary["step"], summary["interrupted"]
except (IndexError, ValueError, KeyError, TypeError) as error:
    sys.exit(f"[local.sh] error: starflow2 train printed no summary (its last stdout line is a JSON object with "
             f"'step' and 'interrupted'): {error!r}")
finally:
    os.remove(partial)
if summary["interrupted"]:
    print(f"[local.sh] training stopped early at step {summary['step']} (SIGTERM)", file=sys.stderr)
    sys.exit(3)
summary["wall_seconds"] = round(float(seconds), 1)
write_json(target, summary)
PY
}

# demo_stage NAME CONFIG [ARGS...]: `starflow2 train --config CONFIG --workdir $DEMO_DIR/NAME ARGS...
# $STARFLOW2_DEMO_TRAIN_ARGS` unless NAME's train_summary.json says it finished (then skipped, and its
# recorded time passed on); dies naming NAME when it fails or stops before its last step.
demo_stage() {
  local name="$1" config="$2"
  shift 2
  local dir="${DEMO_DIR}/${name}"
  local summary="${dir}/train_summary.json" finished
  if finished="$(stage_done "${summary}")"; then
    local step seconds
    read -r step seconds <<< "${finished}"
    log "demo: ${name} finished earlier (step ${step}, ${seconds} s; ${summary}): skipped"
    DEMO_TIMES+=(--time "${name}=${seconds}")
    return 0
  fi
  demo_stopped "${name}"  # a signal between two commands: do not start the next
  local extra=()
  read -r -a extra <<< "${STARFLOW2_DEMO_TRAIN_ARGS:-}"
  log "demo: ${name}: starflow2 train --config ${config} --workdir ${dir}"
  local partial="${DEMO_DIR}/.${name}.train_summary.partial" t0 rc=0
  t0="$(now)"
  run_child "${VENV}/bin/starflow2" train --config "${config}" --workdir "${dir}" "$@" "${extra[@]}" \
    > "${partial}" || rc=$?
  local seconds
  seconds="$(since "${t0}")"
  if (( rc != 0 )); then
    rm -f "${partial}"
    demo_stopped "${name}"
    die "demo: ${name} failed (exit ${rc}): starflow2 train --config ${config} --workdir ${dir} $*"
  fi
  rc=0
  finish_summary "${partial}" "${summary}" "${seconds}" || rc=$?
  demo_stopped "${name}"
  (( rc != 3 )) || die "demo: ${name} stopped before its last step; run the same command again to resume it"
  (( rc == 0 )) || die "demo: ${name}: its train_summary.json could not be written (exit ${rc})"
  DEMO_TIMES+=(--time "${name}=${seconds}")
}

# demo_export: the stage-0 run as a Hugging Face directory ($DEMO_DIR/stage0_hf, the frozen VLM of
# stages 1–3), unless it exists (`starflow2 convert to-hf` writes it whole or not at all).
demo_export() {
  local out="${DEMO_DIR}/stage0_hf"
  if [[ -d "${out}" ]]; then
    log "demo: export ${out} exists: skipped"
    return 0
  fi
  demo_stopped export
  rm -rf -- "${DEMO_DIR}"/.stage0_hf.*.tmp*  # what an export killed midway left (a hidden temporary)
  log "demo: export: starflow2 convert to-hf --workdir ${DEMO_DIR}/stage0 --out ${out}"
  local t0 rc=0
  t0="$(now)"
  run_child "${VENV}/bin/starflow2" convert to-hf --workdir "${DEMO_DIR}/stage0" --out "${out}" > /dev/null || rc=$?
  demo_stopped export
  (( rc == 0 )) || die "demo: export failed (exit ${rc}): starflow2 convert to-hf --workdir ${DEMO_DIR}/stage0 --out ${out}"
  DEMO_TIMES+=(--time "export=$(since "${t0}")")
}

# demo_corpus: prints the stage-0 corpus' size and vocabulary (the run's corpus, the export's tokenizer).
demo_corpus() {
  "${VENV}/bin/python" - "${DEMO_DIR}" <<'PY'
import json
import os
import sys

from tokenizers import Tokenizer

from starflow2_jax.data.demo_text import corpus_summary, demo_corpus

root = sys.argv[1]
with open(os.path.join(root, "stage0", "config.json"), encoding="utf-8") as f:
    lm = json.load(f)["model"]["lm"]
tokenizer = Tokenizer.from_file(os.path.join(root, "stage0_hf", "tokenizer.json"))
s = corpus_summary(demo_corpus(int(lm["corpus_seed"]), int(lm["corpus_documents"]), lm.get("corpus_weights") or {}),
                   encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                   num_slots=int(lm["grid"][0]) * int(lm["grid"][1]))
kinds = ", ".join(f"{kind} {count}" for kind, count in s["kinds"].items())
images = ("images (real training digits, drawn anew each epoch, read by the vision tower)"
          if lm.get("images", "none") == "digits" else "image placeholders")
print(f"[local.sh] demo corpus: {s['documents']} documents ({kinds}), {s['images']} {images}, "
      f"{s['tokens']} tokens ({s['text_tokens']} of text), {s['words']} words ({s['distinct_words']} distinct); "
      f"vocabulary {tokenizer.get_vocab_size(with_added_tokens=True)} tokens", file=sys.stderr)
PY
}

# demo_starflow2 WORKDIR: the STARFlow2 digits demo in WORKDIR (see the header).
demo_starflow2() {
  local workdir="$1"
  local size="${STARFLOW2_DEMO_SIZE:-demo}" stop_after="${STARFLOW2_DEMO_STOP_AFTER:-}" suffix="" scoring_args=()
  [[ "${workdir}" == /* ]] || workdir="${PWD}/${workdir}"  # before the cd below
  case "${size}" in
    demo) ;;
    runlocal)  # a few steps per stage and a few samples per score: the tests
      suffix=",runlocal"
      scoring_args=(--samples-per-digit 2 --grid-per-digit 2 --seeds 1 --held-out 4 --edit 4)
      ;;
    *) die "STARFLOW2_DEMO_SIZE='${size}': expected 'demo' (the real demo) or 'runlocal' (a few steps per stage)" ;;
  esac
  case "${stop_after}" in
    ""|stage0|stage1|stage2|stage3) ;;
    *) die "STARFLOW2_DEMO_STOP_AFTER='${stop_after}': expected one of ${DEMO_STAGES[*]} (or unset)" ;;
  esac
  local configs=("configs/lm.py:demo${suffix}")
  local n
  for n in 1 2 3; do
    configs+=("configs/starflow2.py:demo,stage${n}${suffix}")
  done
  local t_start
  t_start="$(now)"
  DEMO_TIMES=()
  demo_step setup ensure_venv
  cd "${REPO_ROOT}"  # the configs
  local state
  state="$(demo_manifest "${workdir}" "${size}" "${configs[@]}")" || exit 2
  DEMO_DIR="$(cd "${workdir}" && pwd)"
  if [[ "${state}" == resume ]]; then
    log "demo: resuming the ${size} demo in ${DEMO_DIR} (finished stages are skipped)"
  else
    log "demo: a new STARFlow2 digits demo (size ${size}) in ${DEMO_DIR} (${DEMO_DIR}/demo.json)"
  fi
  trap 'on_demo_signal TERM' TERM
  trap 'on_demo_signal INT' INT

  demo_stage stage0 "${configs[0]}"
  demo_export
  demo_corpus
  local stage previous="" vlm=(--config.model.starflow2.vlm_checkpoint="${DEMO_DIR}/stage0_hf"
                                --config.data.data_dir="${DEMO_DIR}/data")
  if [[ "${stop_after}" != stage0 ]]; then
    for n in 1 2 3; do
      stage="stage${n}"
      if [[ -n "${previous}" ]]; then
        demo_stage "${stage}" "${configs[n]}" "${vlm[@]}" --config.train.init_from="${DEMO_DIR}/${previous}"
      else
        demo_stage "${stage}" "${configs[n]}" "${vlm[@]}"
      fi
      previous="${stage}"
      [[ "${stop_after}" == "${stage}" ]] && break
    done
  fi
  if [[ -n "${stop_after}" ]]; then
    log "demo: stopped after ${stop_after} (STARFLOW2_DEMO_STOP_AFTER); no scoring. Rerun without it to go on"
    return 0
  fi

  demo_stopped scoring
  echo
  log "demo: scoring: python -m starflow2_jax.eval.starflow2_demo --workdir ${DEMO_DIR}"
  local t0 rc=0
  t0="$(now)"
  run_child "${VENV}/bin/python" -m starflow2_jax.eval.starflow2_demo --workdir "${DEMO_DIR}" "${DEMO_TIMES[@]}" \
    "${scoring_args[@]}" || rc=$?
  demo_stopped scoring
  (( rc == 0 )) || die "demo: scoring failed (exit ${rc}): python -m starflow2_jax.eval.starflow2_demo --workdir ${DEMO_DIR}"
  DEMO_TIMES+=(--time "scoring=$(since "${t0}")")
  local times="" i entry
  for (( i = 1; i < ${#DEMO_TIMES[@]}; i += 2 )); do
    entry="${DEMO_TIMES[i]}"
    times+="${times:+, }${entry%%=*} ${entry#*=} s"
  done
  cat <<EOT

demo finished in $(since "${t_start}") s (wall time; ${times})
  report        ${DEMO_DIR}/report.html
  metrics       ${DEMO_DIR}/demo_metrics.json
  scoring       ${DEMO_DIR}/scoring/
  stages        ${DEMO_DIR}/stage0 (lm; export stage0_hf), stage1, stage2, stage3 (starflow2 train workdirs)
EOT
}

cmd_demo() {
  local workdir="" flow=0
  while (( $# > 0 )); do
    case "$1" in
      --workdir)
        if (( $# < 2 )) || [[ -z "$2" ]]; then
          die "demo: --workdir needs a directory"
        fi
        workdir="$2"
        shift 2
        ;;
      --workdir=?*) workdir="${1#--workdir=}"; shift ;;
      --flow) flow=1; shift ;;
      -h|--help) usage; return 0 ;;
      *) die "demo: unknown argument '$1' (usage: launch/local.sh demo [--flow] [--workdir DIR])" ;;
    esac
  done
  if (( flow )); then
    demo_flow "${workdir:-${REPO_ROOT}/runs/demo_flow}"
  else
    demo_starflow2 "${workdir:-${REPO_ROOT}/runs/demo}"
  fi
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
