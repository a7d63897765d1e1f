"""The training loop: ``train(config, workdir)`` — mesh, task, optimiser, sharded state, data,
checkpoints, metrics, sample grids, preemption and non-finite handling.

Workdir layout::

    checkpoints/<step>/{state,extra,data_iter,config}   Orbax (see train.checkpoint); ``extra`` without
                                                       the family's frozen parts
    frozen/<part>/                                     only with train.frozen_copy: one copy of each
                                                       frozen part, written once (train.frozen)
    config.json                                        the resolved config of the latest start
    metrics.jsonl                                      one JSON line per log_every steps (and one for the
                                                       partial window at a SIGTERM); each step once
    .lock                                              while a job runs (train.lock): held by process 0
    samples/step_XXXXXX.png                            grids (EMA params when optim.ema_decay > 0), one
                                                       panel per sample.guidance value, same noise each time
    tensorboard/                                       only when TensorFlow is installed

Resume order: this workdir's latest complete checkpoint → ``train.init_from`` (params only) → scratch.
Frozen parts (``train.frozen``) are loaded from their sources at every start, before anything is
written to the workdir; a resume whose frozen sources changed stops (``train.allow_frozen_change``).
SIGTERM (on any process): the handler only sets a flag; the processes agree on one step
(``parallel.StopAgreement``: a vote read one step late, so at most two more steps run), each saves
that step (blocking) and returns normally (a CLI built on it exits 0). A restart may use another
process or device count: the state is resharded onto the new mesh, and the data position is the
step (see ``train.checkpoint``). Non-finite steps are rejected by the step function; after
``train.max_nonfinite_steps`` of them in a row the loop raises ``NonFiniteLossError`` without saving,
and periodic saves are skipped while the latest step is non-finite. The non-finite streak is read
one step late (after the next step is dispatched) so the host never stalls the device pipeline.

Guards (a workdir nothing corrupts or misreads): every static check — the config (NaN / inf
included), mesh versus devices, batch versus shards, the dataset directory and its metadata, the
frozen sources — runs before the first write; the workdir is locked (``train.lock``) for the whole
run; a resume compares the requested config with the stored one (``train.identity``: the model,
data and shape fields must match, the changes allowed are logged) and verifies the checkpoint it
restores (``train.manifest``; ``verify=False`` skips it). A damaged latest step stops the start with
the damaged file and the newest intact step; ``resume_intact=True`` resumes from that step instead,
moving the newer damaged steps aside to ``<step>.damaged``. ``metrics.jsonl`` loses its lines after
the restored step, so the steps a killed run replays are logged once.

Console output goes through ``absl.logging`` at INFO (metrics, progress/ETA, the parameter table).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from starflow2_jax import atomic, parallel
from starflow2_jax.train import checkpoint as ckpt_lib
from starflow2_jax.train import families
from starflow2_jax.train import frozen as frozen_lib
from starflow2_jax.train import images as image_lib
from starflow2_jax.train import identity, inputs
from starflow2_jax.train import manifest as manifest_lib
from starflow2_jax.train import metrics as metrics_lib
from starflow2_jax.train.config_schema import base_config, to_json_dict, validate
from starflow2_jax.train.lock import WorkdirLock
from starflow2_jax.train.optim import make_optimizer
from starflow2_jax.train.state import TrainState, ema_copy
from starflow2_jax.train.step import create_state, make_train_step, state_shardings
from starflow2_jax.train.task import Task

LAST_VALUE_METRICS = ("lr", "skipped_steps", "nonfinite_streak", "update_ok")


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss (or update) was non-finite for too many steps in a row."""


class TrainResult(NamedTuple):
    """state/extra_vars: the final train state; step: its step; metrics: the last logged metrics
    (host floats); interrupted: True when SIGTERM stopped the run early; no_checkpoint: '' when the
    final step is in a checkpoint, else why not (a CLI exits non-zero with it)."""

    state: TrainState
    extra_vars: Any
    step: int
    metrics: dict
    interrupted: bool
    no_checkpoint: str = ""


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A validated copy of ``config`` with data-dependent defaults filled in by its family (caption
    vocabulary and grid prompts for the digits; the latent view of ``model.latent``; a DINOv2
    checkpoint's config), so the stored config fully determines the model."""
    config = ml_collections.ConfigDict(config.to_dict())
    validate(config)
    families.get(config.model.family).resolve(config)
    return config


def _check_resume(config, workdir: str, records: dict, step: int | None) -> None:
    """At a resume from ``step``, the frozen parts just loaded must be the ones that step recorded."""
    if step is None:
        return
    root = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
    stored = ckpt_lib.read_config_json(os.path.join(root, str(step))).get("frozen", {})
    frozen_lib.check_unchanged(stored, records, allow=bool(config.train.allow_frozen_change),
                               where=f"step {step} of {workdir}")


def _static_checks(config, mesh) -> None:
    """The checks that need the mesh or the disk but write nothing: batch versus batch shards and the
    dataset directory (``data.builder='directory'``; the other builders write their own data)."""
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES)
    batch = int(config.data.batch_size)
    if batch % shards or batch % jax.process_count():
        raise ValueError(
            f"data.batch_size={batch}: expected a multiple of the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)} (axes {parallel.BATCH_AXES}) and of the {jax.process_count()} processes")
    if config.data.builder == "directory":
        from starflow2_jax.data.check import check_dataset_dir

        check_dataset_dir(config.data.data_dir, field="data.data_dir", splits=[config.data.split])


def _make_mesh(config):
    """The config's mesh; ValueError naming ``mesh`` and the device count when it does not fit."""
    try:
        return parallel.make_mesh(dict(config.mesh))
    except ValueError as error:
        raise ValueError(f"mesh={dict(config.mesh)}: expected axis sizes whose product is the "
                         f"{jax.device_count()} devices here ({error})") from error


def _stored_identity(workdir: str, step: int | None) -> dict | None:
    """The run's stored config: checkpoint ``step``'s, else ``config.json``, else None."""
    if step is not None:
        return ckpt_lib.read_config_json(os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR, str(step)))
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        import json

        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _resume_checks(config, workdir: str, *, verify: bool, resume_intact: bool) -> tuple[int | None, list[int]]:
    """``(step to restore or None, damaged newer steps to set aside)``, writing nothing: the latest
    complete checkpoint against its manifest (``verify``; the newest intact step instead only with
    ``resume_intact``), then the requested config against the stored one of that step
    (``identity.compare``; the allowed changes are logged)."""
    root = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
    steps = ckpt_lib.complete_steps(root)
    restore_step, damaged = (steps[-1] if steps else None), []
    if steps and verify and not resume_intact:
        manifest_lib.verify_step(root, steps[-1], steps, hint="resume from it with --resume-intact, or "
                                 "train(..., resume_intact=True)")
    elif steps and verify:
        restore_step = manifest_lib.newest_intact(root, steps)
        damaged = [s for s in steps if restore_step is None or s > restore_step]
        if damaged:
            logging.warning("resume_intact: checkpoint step(s) %s are damaged; resuming from %s", damaged,
                            f"step {restore_step}" if restore_step is not None else "scratch (no intact step)")
    stored = _stored_identity(workdir, restore_step)
    if stored is not None:
        for line in identity.compare(stored, to_json_dict(config), defaults=to_json_dict(base_config())):
            logging.info("config change at resume (allowed): %s", line)
    return restore_step, damaged


def _prepare_workdir(workdir: str, restore_step: int | None, damaged: list[int]) -> None:
    """Process 0, once the checks passed: damaged steps renamed ``<step>.damaged``; ``metrics.jsonl``
    without the lines after the step the run restarts from."""
    if jax.process_index() != 0:
        return
    root = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
    for step in damaged:
        target = os.path.join(root, f"{step}.damaged")
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(root, f"{step}.damaged{suffix}"), suffix + 1
        os.rename(os.path.join(root, str(step)), target)
        logging.warning("moved damaged checkpoint step %d to %s", step, target)
    dropped = metrics_lib.drop_after(os.path.join(workdir, "metrics.jsonl"), restore_step or 0)
    if dropped:
        logging.info("metrics.jsonl: dropped %d line(s) after step %d (they are logged again)", dropped,
                     restore_step or 0)


def _initial_state(config, task, optimizer, shardings, checkpointer, data_iter, ema: bool, frozen: dict,
                   restore_step: int | None = None):
    """``(state, extra)``: resumed (from ``restore_step``), from ``train.init_from`` or fresh; ``frozen``
    (the loaded frozen parts) completes the extra vars (they are never in a checkpoint)."""
    names = tuple(frozen)
    abstract_extra = {k: v for k, v in shardings.abstract_extra.items() if k not in names}
    latest = restore_step
    if latest is not None:
        state, extra = checkpointer.restore(latest, shardings.abstract_state, abstract_extra, data_iter)
        logging.info("resumed from %s at step %d", os.fspath(checkpointer.directory), latest)
        return state, {**extra, **frozen}
    state, extra = create_state(task, optimizer, shardings, jax.random.key(int(config.seed)), ema=ema,
                                skip_extra=names)
    if config.train.init_from:
        params, extra = ckpt_lib.load_params(config.train.init_from, shardings.abstract_state.params, abstract_extra,
                                             fresh_params=state.params, new_patterns=tuple(config.train.init_new))
        trainable = task.trainable(params) if task.trainable is not None else None
        state = state.replace(params=params, ema_params=ema_copy(params, trainable) if ema else None)
        logging.info("starting from the params of %s", config.train.init_from)
    return state, {**extra, **frozen}


def _flush_partial_window(history: list[dict], step: int, progress, writer, interrupted: bool) -> dict:
    """The mean metrics of the steps since the last log line; at a SIGTERM they are also logged at
    ``step`` (the step the checkpoint holds), so no step is left out of ``metrics.jsonl``."""
    window = _mean_metrics(history)
    if interrupted:
        window.update(progress.update(step))
        writer.write_scalars(step, window)
    return window


def _log_parameters(params) -> None:
    from clu import parameter_overview  # TF-free

    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("trainable parameters (%d):\n%s", total, table)


def _write_samples(task: Task, state: TrainState, extra, config, workdir: str, writer, step: int) -> str | None:
    params = state.ema_params if state.ema_params is not None else state.params
    rng = jax.random.key(int(config.seed) + 1)  # the same noise every time: grids are comparable over steps
    panels, named = [], {}
    for g in config.sample.guidance:
        grid = task.sample_grid(params, extra, rng, guidance=float(g))
        pixels = image_lib.to_uint8(multihost_utils.process_allgather(grid.images, tiled=True))
        panel = image_lib.tile(pixels)
        panels.append(panel)
        named[f"samples/guidance_{g:g}"] = panel[None]
    writer.write_images(step, named)
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
    return image_lib.save_png(path, image_lib.side_by_side(panels), scale=4)


def _mean_metrics(history: list[dict]) -> dict:
    host = jax.device_get(history)
    out = {}
    for name in host[-1]:
        values = np.asarray([h[name] for h in host], np.float64)
        out[name] = float(values[-1] if name in LAST_VALUE_METRICS else values.mean())
    return out


def train(config: ml_collections.ConfigDict, workdir: os.PathLike | str, *, task: Task | None = None,
          data: grain.IterDataset | None = None, stop_after: int | None = None, verify: bool = True,
          resume_intact: bool = False, host_log: bool = False) -> TrainResult:
    """Trains (or resumes) the model ``config`` describes in ``workdir``; returns a ``TrainResult``.

    Holds ``workdir``'s lock (``train.lock``; process 0) for the whole call; see ``_train`` for the
    arguments. Raises ``lock.WorkdirLockedError`` when another live job holds it.
    """
    with WorkdirLock(os.fspath(workdir), enabled=jax.process_index() == 0):
        try:
            return _train(config, workdir, task=task, data=data, stop_after=stop_after, verify=verify,
                          resume_intact=resume_intact, host_log=host_log)
        finally:
            if host_log:  # the log file belongs to this call (a later refused call must not append to it)
                parallel.remove_host_log(os.fspath(workdir))


def _train(config: ml_collections.ConfigDict, workdir: os.PathLike | str, *, task: Task | None = None,
           data: grain.IterDataset | None = None, stop_after: int | None = None, verify: bool = True,
           resume_intact: bool = False, host_log: bool = False) -> TrainResult:
    """``train`` under the workdir's lock.

    Args:
      config: a training config (see ``train.config_schema``); validated here.
      workdir: checkpoints, metrics and samples go here (see the module docstring).
      task: the ``Task`` to train (default: the one ``config.model.family`` makes, ``train.families``).
      data: this process's stream of batches (default: built from ``config.data``); its iterator
        state is checkpointed, so it must be a grain ``IterDataset``.
      stop_after: stop (with a checkpoint) once this step is reached, though the LR schedule still
        spans ``train.steps`` — for jobs that train in slices.
      verify: check the checkpoint a resume restores against its checksum manifest.
      host_log: also log to ``<workdir>/logs/process_<i>.log`` (``parallel.add_host_log``), from the
        moment every check has passed and the workdir exists (the CLI turns it on).
      resume_intact: when the latest checkpoint is damaged, resume from the newest intact one (the
        damaged steps are moved aside) instead of stopping.
    Raises (all before anything is written to ``workdir``):
      FileNotFoundError / ValueError: a bad config, mesh, batch, dataset or frozen-part source, or a
        changed frozen part at resume; an ``init_from`` checkpoint whose parameters differ.
      identity.ConfigMismatchError: a resume whose model, data or shape fields differ from the stored run's.
      manifest.CheckpointDamagedError: the latest checkpoint is damaged (and not ``resume_intact``).
      NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite steps in a row (nothing saved for them).
    """
    config = resolve_config(config)
    workdir = os.fspath(workdir)
    tc = config.train
    total = int(tc.steps) if stop_after is None else min(int(tc.steps), int(stop_after))
    parallel.set_compilation_cache(str(config.train.compilation_cache_dir))
    mesh = _make_mesh(config)
    _static_checks(config, mesh)
    family = families.get(config.model.family)
    task = task if task is not None else family.make_task(config)
    optimizer, _ = make_optimizer(config.optim, int(tc.steps), trainable=task.trainable)
    ema = float(config.optim.ema_decay) > 0
    shardings = state_shardings(task, optimizer, mesh, ema=ema)
    # frozen parts: loaded (and checked) at every start, before anything is written to the workdir
    frozen, records = frozen_lib.load_parts(family.frozen_parts(config), shardings.abstract_extra,
                                            seed=int(config.seed), init_from=str(tc.init_from))
    config.frozen = ml_collections.ConfigDict(records)
    restore_step, damaged = _resume_checks(config, workdir, verify=verify, resume_intact=resume_intact)
    _check_resume(config, workdir, records, restore_step)
    if tc.init_from and restore_step is None:  # a checkpoint that does not fit this stage: an error before any write
        ckpt_lib.check_init_from(tc.init_from, shardings.abstract_state.params,
                                 {k: v for k, v in shardings.abstract_extra.items() if k not in frozen},
                                 new_patterns=tuple(tc.init_new))
    if data is None:  # before the workdir exists: a family's data hook may check its first batch
        data = (family.train_data or inputs.make_train_data)(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    if host_log:
        parallel.add_host_log(workdir)
    _prepare_workdir(workdir, restore_step, damaged)
    if tc.frozen_copy:
        for name, tree in frozen.items():
            frozen_lib.write_copy(workdir, name, tree, records[name])
    data_iter = iter(data)
    config_json = to_json_dict(config)
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(workdir, "config.json"), config_json)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR), keep_last=int(tc.keep_last),
                                         keep_every=int(tc.keep_every), async_save=bool(tc.async_checkpoint))
    writer = metrics_lib.create_writer(workdir)
    with contextlib.ExitStack() as stack:
        stack.callback(writer.close)
        stack.callback(checkpointer.close)
        flag = stack.enter_context(parallel.StopAgreement(mesh))  # early: a SIGTERM during compile still saves
        state, extra = _initial_state(config, task, optimizer, shardings, checkpointer, data_iter, ema, frozen,
                                      restore_step)
        step = int(jax.device_get(state.step))
        if jax.process_index() == 0:
            _log_parameters(state.params)
        train_step = make_train_step(task, optimizer, mesh, shardings, config)
        progress = metrics_lib.Progress(total, step)
        history: list[dict] = []
        last_metrics: dict = {}

        def save(wait: bool = False) -> bool:
            saved_extra = {k: v for k, v in extra.items() if k not in frozen}  # frozen parts: never saved
            return checkpointer.save(step, state, saved_extra, data_iter, config_json, wait=wait)

        def check(at_step: int, step_metrics: dict) -> int:
            """The non-finite streak after ``at_step``; raises once it reaches the limit."""
            streak = int(jax.device_get(step_metrics["nonfinite_streak"]))
            if streak:
                logging.warning("step %d: non-finite loss or update, update skipped (%d in a row, %d in total)",
                                at_step, streak, int(jax.device_get(step_metrics["skipped_steps"])))
            if streak >= int(tc.max_nonfinite_steps):
                checkpointer.wait()
                raise NonFiniteLossError(
                    f"the loss was non-finite for {streak} steps in a row (train.max_nonfinite_steps="
                    f"{tc.max_nonfinite_steps}), up to step {at_step}; no checkpoint was written for these "
                    f"steps. Latest checkpoint: step {checkpointer.latest_step()} in {workdir}")
            return streak

        pending = None  # the previous step's metrics, checked after the next step is dispatched
        first_step = step
        while step < total and not flag.stop:
            batch = parallel.shard_batch(task.prepare_batch(next(data_iter)), mesh)
            state, step_metrics = train_step(state, extra, batch)
            step += 1
            flag.vote(step)  # SIGTERM anywhere: every process sees stop after the same step
            history.append(step_metrics)
            if pending is not None:
                check(*pending)  # one step late: keeps a step in flight while the host waits
            pending = (step, step_metrics)
            log_now = step % int(tc.log_every) == 0 or step == total
            sample_now = bool(tc.sample_every) and step % int(tc.sample_every) == 0
            save_now = (bool(tc.checkpoint_every) and step % int(tc.checkpoint_every) == 0 and step < total
                        and not flag.stop)  # the agreed stop step is saved below
            if not (log_now or sample_now or save_now):
                continue
            streak = check(*pending)
            pending = None
            if log_now:
                last_metrics = _mean_metrics(history)
                history = []
                last_metrics.update(progress.update(step))
                writer.write_scalars(step, last_metrics)
                logging.info("step %d/%d, %.2f steps/s, ETA %s", step, total, last_metrics["steps_per_sec"],
                             metrics_lib.format_eta(last_metrics["eta_seconds"]))
            if sample_now:
                _write_samples(task, state, extra, config, workdir, writer, step)
            if save_now:
                if streak:
                    logging.warning("step %d: skipping the checkpoint, the latest step was non-finite", step)
                else:
                    save()
        finished = step == int(tc.steps) and step > first_step  # this call ran the schedule's last step
        streak = check(*pending) if pending is not None else int(jax.device_get(state.nonfinite_streak))
        if history:
            last_metrics = _flush_partial_window(history, step, progress, writer, flag.stop)
        if finished and not streak and not flag.stop and task.finalize is not None:
            extra = task.finalize(state.params, extra, data_iter)  # e.g. the FAE's latent statistics
        no_checkpoint = ""
        if flag.stop:
            checkpointer.wait()
            saved = save(wait=True)
            logging.warning("stopped by SIGTERM at step %d (%s)", step,
                            "checkpoint written" if saved or step in checkpointer.all_steps() else "NO checkpoint")
            if not (saved or step in checkpointer.all_steps()):
                no_checkpoint = f"stopped by SIGTERM at step {step}, and the train state was not finite"
        elif streak:
            logging.warning("step %d: no final checkpoint, the latest step was non-finite", step)
            no_checkpoint = f"the latest step ({step}) was non-finite ({streak} in a row)"
        elif step > 0:
            save(wait=True)
        checkpointer.wait()  # the final step's manifest
        if no_checkpoint:
            no_checkpoint += f"; the latest checkpoint is step {checkpointer.latest_step()} in {workdir}"
        writer.flush()
        return TrainResult(state=state, extra_vars=extra, step=step, metrics=last_metrics,
                           interrupted=flag.stop, no_checkpoint=no_checkpoint)
