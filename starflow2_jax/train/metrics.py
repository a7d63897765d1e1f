"""Metric writers (console, ``metrics.jsonl``, TensorBoard when TensorFlow is installed) and progress/ETA.

``clu.metric_writers`` (and ``clu.periodic_actions``) import TensorFlow unconditionally, and TF is an
optional extra (``pip install 'starflow2-jax[tf]'``). So the writers here are small TF-free
equivalents with clu's ``MetricWriter`` interface (``write_scalars``, ``write_images``,
``write_hparams``, ``flush``, ``close``); when TF imports, clu's ``SummaryWriter`` is added to them
for TensorBoard (``<workdir>/tensorboard``). Without TF one line says that TensorBoard is off.
Only process 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging


def _scalar(value) -> float | int:
    value = np.asarray(value)
    return value.item() if value.size == 1 else float("nan")


class ConsoleWriter:
    """Logs scalars as one ``absl.logging`` line per call: ``[step 100] loss=0.123 lr=1e-3 …``."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        parts = " ".join(f"{k}={_format(_scalar(v))}" for k, v in sorted(scalars.items()))
        logging.info("[step %d] %s", step, parts)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class JsonlWriter:
    """Appends one JSON object per ``write_scalars`` call to ``path``: ``{"step": s, name: value…}``
    (non-finite values are written as the strings "nan" / "inf" / "-inf" to stay valid JSON)."""

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        for name, value in sorted(scalars.items()):
            value = _scalar(value)
            record[name] = value if not isinstance(value, float) or math.isfinite(value) else str(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MultiWriter:
    """Forwards every call to each of ``writers``."""

    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def drop_after(path: os.PathLike | str, step: int) -> int:
    """Rewrites the ``metrics.jsonl`` at ``path`` without its lines for steps after ``step`` (and
    without a torn last line), atomically; returns how many lines were dropped. A resume calls it with
    the restored step, so the steps replayed after a kill are logged once. No file: 0."""
    from starflow2_jax import atomic

    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        atomic.write_text(path, "".join(kept))
    return len(lines) - len(kept)


def tensorboard_writer(logdir: os.PathLike | str):
    """clu's TensorBoard ``SummaryWriter`` for ``logdir``, or None when TensorFlow is not installed."""
    try:
        from clu.metric_writers import SummaryWriter  # imports TensorFlow
    except ImportError:
        return None
    return SummaryWriter(os.fspath(logdir))


def create_writer(workdir: os.PathLike | str, *, tensorboard: bool = True) -> MultiWriter:
    """Console on every process; on process 0 also ``<workdir>/metrics.jsonl`` and TensorBoard
    (``<workdir>/tensorboard``) when TensorFlow is available."""
    writers: list[Any] = [ConsoleWriter()]
    if jax.process_index() == 0:
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
        if tensorboard:
            summary = tensorboard_writer(os.path.join(workdir, "tensorboard"))
            if summary is None:
                logging.warning("TensorBoard logging is off: TensorFlow is not installed (pip install "
                                "'starflow2-jax[tf]'); metrics go to the console and %s",
                                os.path.join(workdir, "metrics.jsonl"))
            else:
                writers.append(summary)
    return MultiWriter(writers)


class Progress:
    """Steps/s and ETA between calls (a TF-free stand-in for ``clu.periodic_actions.ReportProgress``)."""

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps = int(total_steps)
        self._step = int(start_step)
        self._time = time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        """``{'steps_per_sec', 'eta_seconds'}`` since the previous call (or the start)."""
        now = time.perf_counter()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = int(step), now
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        return {"steps_per_sec": rate, "eta_seconds": eta}


def format_eta(seconds: float) -> str:
    """``'1h02m'`` / ``'3m05s'`` / ``'12s'`` (``'?'`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
