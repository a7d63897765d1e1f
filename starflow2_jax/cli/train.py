"""`starflow2 train --config FILE[:PRESET] --workdir DIR [--config.a.b=VALUE ...]`: train or resume a model.

The config file's ``get_config(PRESET)`` plus the overrides is validated before anything starts
(an error names the field); the run resumes from DIR's latest complete checkpoint when there is
one. SIGTERM saves the current step and exits 0. Every error that stops a start (a bad config, a
locked workdir, a config that differs from the stored run's, a damaged checkpoint, a bad dataset)
is one line on stderr and exit status 2, with nothing written; a run that ends without a final
checkpoint (non-finite steps) exits 1 and says why. ``--preempted-exit-code N`` makes a run that
SIGTERM stopped (after saving) exit N instead of 0: a scheduler that restarts only failed jobs (a
GKE JobSet under xpk, ``launch/tpu/xpk.sh``) then restarts it, and the restart resumes. Prints where everything goes, then a JSON summary
of the last logged metrics on stdout.
"""

from __future__ import annotations

import argparse
import json
import os

from starflow2_jax.cli.common import add_distributed_arguments, fail, note, setup_logging, start_runtime

NAME = "train"
HELP = "train (or resume) a model from a config file; --config.a.b=VALUE overrides fields"
EXTRA_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("starflow2 train --config FILE[:PRESET] --workdir DIR [--config.FIELD=VALUE ...] "
                    "[--stop-after STEP] [--resume-intact] [--no-verify] [--preempted-exit-code N] [--verbose]")
    parser.add_argument("--config", required=True, metavar="FILE[:PRESET]",
                        help="config file and preset, e.g. configs/demo.py or configs/demo.py:caption")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="checkpoints, metrics, samples and the resolved config go here (resumes from it)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop (with a checkpoint) at this step; the LR schedule still spans train.steps")
    parser.add_argument("--resume-intact", action="store_true",
                        help="when the latest checkpoint is damaged, resume from the newest intact one (the damaged "
                             "steps are moved aside to <step>.damaged) instead of stopping")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the restored checkpoint against its checksum manifest (huge checkpoints)")
    parser.add_argument("--preempted-exit-code", type=int, default=0, metavar="N",
                        help="exit status of a run that SIGTERM stopped after saving its step (default 0; non-zero "
                             "makes a scheduler that restarts only failed jobs, e.g. a JobSet, restart it)")
    parser.add_argument("--verbose", action="store_true", help="keep the INFO logs of Orbax, grain and TFDS")
    add_distributed_arguments(parser)


def _check_paths(config) -> None:
    """Fails early, naming the field, on local paths the run would only trip over after compiling."""
    data_dir = str(config.data.data_dir)
    if config.data.builder == "directory" and "://" not in data_dir and not os.path.isdir(data_dir):
        raise ValueError(f"data.data_dir={data_dir!r}: no such directory (a prepared TFDS dataset directory)")
    init_from = str(config.train.init_from)
    if init_from and "://" not in init_from and not os.path.exists(init_from):
        raise ValueError(f"train.init_from={init_from!r}: no such file or directory")


def load_and_validate(spec: str, extra: list[str]):
    """The validated config of ``spec`` with the ``--config.*`` overrides in ``extra`` applied."""
    from starflow2_jax.config_files import ConfigError, load_config, split_override_args
    from starflow2_jax.train.config_schema import validate

    overrides, rest = split_override_args(extra)
    if rest:
        raise ConfigError(f"unrecognized arguments {rest} (overrides look like --config.FIELD=VALUE)")
    config = load_config(spec, overrides)
    try:
        validate(config)
    except ValueError as error:
        raise ConfigError(f"invalid config {spec}: {error}") from error
    _check_paths(config)
    return config


def _describe(workdir: str, config, spec: str) -> None:
    from starflow2_jax.train.checkpoint import CHECKPOINT_SUBDIR, complete_steps

    steps = complete_steps(os.path.join(workdir, CHECKPOINT_SUBDIR))
    start = f"resuming from step {steps[-1]}" if steps else "starting from scratch"
    if not steps and config.train.init_from:
        start = f"starting from the params of {config.train.init_from}"
    every = int(config.train.sample_every)
    samples = os.path.join(workdir, "samples", "step_XXXXXX.png") if every else "off (train.sample_every=0)"
    note(f"starflow2 train: {spec}, {int(config.train.steps)} steps, {start}\n"
         f"  workdir      {workdir}\n"
         f"  checkpoints  {os.path.join(workdir, CHECKPOINT_SUBDIR)}/<step>  (every "
         f"{int(config.train.checkpoint_every) or 'end only'}, keep {int(config.train.keep_last)})\n"
         f"  metrics      {os.path.join(workdir, 'metrics.jsonl')}  (every {int(config.train.log_every)} steps)\n"
         f"  samples      {samples}\n"
         f"  config       {os.path.join(workdir, 'config.json')}\n"
         f"  tensorboard  tensorboard --logdir {os.path.join(workdir, 'tensorboard')}  (needs starflow2-jax[tf])")


def run(args: argparse.Namespace) -> int:
    from starflow2_jax.config_files import ConfigError

    try:
        config = load_and_validate(args.config, list(getattr(args, "extra", [])))
    except (ConfigError, ValueError, FileNotFoundError) as error:
        return fail(NAME, error)
    if args.stop_after is not None and args.stop_after < 1:
        return fail(NAME, f"--stop-after {args.stop_after}: expected a step >= 1")
    if not 0 <= args.preempted_exit_code <= 255:
        return fail(NAME, f"--preempted-exit-code {args.preempted_exit_code}: expected an exit status 0..255")
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        return fail(NAME, f"--workdir {args.workdir!r} exists and is not a directory")

    setup_logging(args.verbose)
    from starflow2_jax.parallel import DistributedError

    try:
        start_runtime(args)  # jax.distributed (multi-host); the loop adds this process's log file
    except DistributedError as error:
        return fail(NAME, error)
    from starflow2_jax.train.lock import WorkdirLockedError
    from starflow2_jax.train.loop import NonFiniteLossError, train

    _describe(workdir, config, args.config)
    try:
        result = train(config, workdir, stop_after=args.stop_after, verify=args.verify,
                       resume_intact=args.resume_intact, host_log=True)
    except NonFiniteLossError as error:
        return fail(NAME, error, status=1)
    except (ValueError, FileNotFoundError, WorkdirLockedError) as error:  # bad data, frozen sources, init_from: named
        return fail(NAME, error)
    summary = {"workdir": workdir, "step": result.step, "interrupted": result.interrupted,
               "metrics": {k: v for k, v in result.metrics.items() if v == v}}  # NaN-free JSON
    print(json.dumps(summary), flush=True)
    done = f"{'stopped by SIGTERM' if result.interrupted else 'done'} at step {result.step}."
    from starflow2_jax.train import families

    if result.no_checkpoint:
        return fail(NAME, f"{done} No final checkpoint: {result.no_checkpoint}", status=1)
    if result.interrupted:
        note(f"{done} Rerun the same command to resume.")
        return args.preempted_exit_code
    hint = families.get(config.model.family).next_steps(config, workdir)
    note(done + (f" Next:\n{hint}" if hint else ""))
    return 0
