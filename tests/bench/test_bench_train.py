"""The train-step benchmark: one JSON line for a tiny config; its tarflow-32 is the flow benchmark's.

Throughputs are only checked to be positive and finite; wall-clock values are never asserted.
"""

from __future__ import annotations

import json
import math

import pytest

from starflow2_jax.bench import flow as bench_flow
from starflow2_jax.bench import train as bench_train
from starflow2_jax.train import flow_config_from, validate

POSITIVE_KEYS = ("train_steps_per_s", "train_step_ms", "images_per_s", "compile_s", "num_params")


@pytest.mark.slow
def test_runlocal_config_prints_one_json_line(capsys):
    assert bench_train.main(["--config", "configs/demo.py:runlocal", "--steps", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert (record["benchmark"], record["config"], record["batch"]) == ("train", "configs/demo.py:runlocal", 16)
    assert record["devices"]["count"] >= 1 and record["mesh"]["data"] == record["devices"]["count"]
    for key in POSITIVE_KEYS:
        assert isinstance(record[key], (int, float)) and math.isfinite(record[key]) and record[key] > 0, key
    assert math.isclose(record["images_per_s"], 16 * record["train_steps_per_s"], rel_tol=2e-3)
    assert math.isfinite(record["train_loss"]) and "adamw" in record["optimizer"]


def test_named_settings():
    tarflow = bench_train.load("tarflow-32")
    validate(tarflow)
    assert flow_config_from(tarflow) == bench_flow.CONFIGS["tarflow-32"].make()
    assert tarflow.data.batch_size == bench_flow.CONFIGS["tarflow-32"].batch
    assert bench_train.load("demo").to_dict() == bench_train.load("configs/demo.py").to_dict()


def test_list_names_every_setting(capsys):
    assert bench_train.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "demo-caption", "tarflow-32"))
