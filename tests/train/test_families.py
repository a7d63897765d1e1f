"""The family registry and the frozen-part mechanism, through a toy family defined in this file only.

The toy family ('toy') registers itself here (no package file knows it) and declares a config
section (``model.toy``), a Task, and one frozen part ('encoder': a fixed projection plus a table
whose size is configurable). The tests train it through the loop, checkpoint, resume, restore and
evaluate it; list what the step checkpoints hold; change the frozen source under a resume; give
bad sources; run ``init_from`` between parameter trees that differ; and size the EMA.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import pipeline

from starflow2_jax.parallel import FLOW_RULES
from starflow2_jax.train import base_config, checkpoint, families, frozen
from starflow2_jax.train import config_fields as fields
from starflow2_jax.train.family import Family
from starflow2_jax.train.loop import train
from starflow2_jax.train.restore import restore_workdir
from starflow2_jax.train.task import SampleGrid, TaskBase

FEATURES = 16


def encoder_init(seed: int, rows: int) -> dict:
    """The frozen part's random weights for a '' source (a function of the seed only)."""
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), 99))
    return {"proj": jax.random.normal(k1, (64, FEATURES)) / 8.0, "table": 0.01 * jax.random.normal(k2, (rows, FEATURES))}


class ToyFamilyTask(TaskBase):
    """features = tanh(x·proj + mean(table)) (frozen), pred = tanh(features·W + b)·head [+ adapter]."""

    rules = FLOW_RULES

    def __init__(self, section):
        self.hidden = int(section.hidden)
        self.rows = int(section.rows)
        self.adapter = bool(section.adapter)
        self.extra_head = bool(section.extra_head)
        self.seed_for_encoder = 0
        if section.freeze_head:
            self.trainable = lambda params: {k: jax.tree.map(lambda _, k=k: k != "head", v) for k, v in params.items()}

    def init(self, rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        params = {"dense": {"kernel": nn.Partitioned(jax.random.normal(k1, (FEATURES, self.hidden)) / 4.0,
                                                     names=("embed", "mlp")),
                            "bias": nn.Partitioned(jnp.zeros(self.hidden), names=("mlp",))},
                  "head": {"kernel": nn.Partitioned(jax.random.normal(k2, (self.hidden,)) / 4.0, names=("mlp",))}}
        if self.adapter:
            params["adapter"] = {"kernel": nn.Partitioned(jax.random.normal(k3, (self.hidden,)), names=("mlp",))}
        if self.extra_head:
            params["extra_head"] = {"kernel": nn.Partitioned(jnp.ones((3,)), names=(None,))}
        encoder = encoder_init(0, self.rows)  # placeholder values: the frozen part is loaded over it
        return params, {"encoder": encoder, "stats": {"scale": jnp.ones(())}}

    def prepare_batch(self, batch):
        return {"image": np.asarray(batch["image"], np.float32), "label": np.asarray(batch["label"], np.int32)}

    def _pred(self, params, extra, image):
        x = image.reshape(image.shape[0], -1)
        enc = extra["encoder"]
        f = jnp.tanh(x @ enc["proj"] + jnp.mean(enc["table"], 0))
        h = jnp.tanh(f @ params["dense"]["kernel"] + params["dense"]["bias"])
        head = params["head"]["kernel"] + (params["adapter"]["kernel"] if self.adapter else 0.0)
        return (h @ head) * extra["stats"]["scale"]

    def loss(self, params, extra, batch, rng):
        del rng
        err = self._pred(params, extra, batch["image"]) - jnp.maximum(batch["label"], 0) / 10.0
        return jnp.mean(err ** 2), {"mse": jnp.mean(err ** 2)}

    def eval_step(self, params, extra, batch, rng):
        del rng
        return {"sq_err": (self._pred(params, extra, batch["image"]) - jnp.maximum(batch["label"], 0) / 10.0) ** 2}

    def sample_grid(self, params, extra, rng, *, guidance):
        del guidance
        return SampleGrid(jnp.tanh(jax.random.normal(rng, (1, 2, 8, 8, 1))) + 0 * params["head"]["kernel"][0], ["a"])


def add_defaults(config):
    config.model.toy = ml_collections.ConfigDict(dict(hidden=8, rows=4, adapter=False, extra_head=False,
                                                      freeze_head=False, encoder_source=""))


def validate(config):
    fields.int_field(config, "model.toy.hidden", 1)
    fields.int_field(config, "model.toy.rows", 1)
    fields.string_field(config, "model.toy.encoder_source", "a path ('' for random)")


def frozen_parts(config):
    rows = int(config.model.toy.rows)
    return (frozen.FrozenPart(name="encoder", field="model.toy.encoder_source",
                              source=str(config.model.toy.encoder_source), dtype="float32",
                              init=lambda seed: encoder_init(seed, rows)),)


TOY = Family(name="toy", add_defaults=add_defaults, validate=validate,
             make_task=lambda config: ToyFamilyTask(config.model.toy), frozen_parts=frozen_parts)


@pytest.fixture(autouse=True)
def toy_family():
    families.register(TOY, replace=True)
    yield
    families.unregister("toy")


def toy_config(**overrides):
    c = base_config()
    c.model.family = "toy"
    c.data.batch_size = 8
    c.optim.warmup_steps = 1
    c.optim.lr = 1e-2
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.async_checkpoint = False
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def stored_keys(step_dir, item: str) -> set[str]:
    """The array paths a step checkpoint's item holds (from its metadata)."""
    return set(checkpoint.stored_shapes(os.path.join(step_dir, item)))


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def write_source(path, tree) -> str:
    """An Orbax checkpoint with a ``params`` item (the layout ``starflow2 convert`` writes)."""
    handler = ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler())
    with ocp.Checkpointer(handler) as writer:
        writer.save(os.fspath(path), args=ocp.args.Composite(params=ocp.args.StandardSave(tree)), force=True)
    return os.fspath(path)


def test_toy_family_is_found_by_name_and_validates_its_section():
    assert "toy" in families.names() and families.get("toy") is TOY
    with pytest.raises(ValueError, match=r"model\.toy\.hidden=0"):
        from starflow2_jax.train import validate as validate_config

        validate_config(toy_config(**{"model.toy.hidden": 0}))
    with pytest.raises(ValueError,
                       match=r"model\.family='nope': expected one of \('flow', 'fae', 'starflow2', 'lm', 'toy'\)"):
        families.get("nope")


def test_toy_family_trains_checkpoints_resumes_and_evaluates(tmp_path):
    config = toy_config()
    first = train(config, tmp_path / "run", data=pipeline(config), stop_after=2)
    assert first.step == 2
    final = train(config, tmp_path / "run", data=pipeline(config))  # resumes at 2
    assert final.step == 4 and checkpoint.complete_steps(tmp_path / "run" / "checkpoints") == [2, 4]
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    assert stored_keys(step_dir, "extra") == {"stats/scale"}  # the frozen encoder is not in the step
    assert not any("encoder" in k for k in stored_keys(step_dir, "state"))

    restored = restore_workdir(tmp_path / "run")
    assert isinstance(restored.task, ToyFamilyTask) and restored.step == 4
    np.testing.assert_array_equal(np.asarray(restored.extra["encoder"]["proj"]), encoder_init(0, 4)["proj"])
    batch = restored.task.prepare_batch(next(iter(pipeline(config))))
    got = restored.task.eval_step(restored.params, restored.extra, batch, None)["sq_err"]
    want = ToyFamilyTask(config.model.toy).eval_step(final.state.params, final.extra_vars, batch, None)["sq_err"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_step_checkpoint_size_does_not_depend_on_the_frozen_part(tmp_path):
    sizes = {}
    for rows in (4, 65536):  # a 256 B table vs a 4 MiB one
        config = toy_config(**{"model.toy.rows": rows, "train.steps": 2})
        train(config, tmp_path / str(rows), data=pipeline(config))
        sizes[rows] = dir_bytes(tmp_path / str(rows) / "checkpoints" / "2")
    print(f"step checkpoint bytes by frozen table rows: {sizes}")
    # Orbax's OCDBT layout varies by a few KiB from run to run (how writes are batched into data
    # files); the table alone is 4 MiB, so 64 KiB still tells 'not saved' from 'saved'
    assert abs(sizes[65536] - sizes[4]) < 64 << 10, sizes
    assert sizes[4] < 1 << 20


def test_resume_after_the_frozen_source_changed(tmp_path):
    source = write_source(tmp_path / "enc", encoder_init(1, 4))
    config = toy_config(**{"model.toy.encoder_source": source})
    train(config, tmp_path / "run", data=pipeline(config), stop_after=2)
    write_source(tmp_path / "enc", encoder_init(2, 4))  # same tree, other weights
    with pytest.raises(ValueError, match=r"(?s)frozen part 'encoder': content .*train\.allow_frozen_change=True"):
        train(config, tmp_path / "run", data=pipeline(config))
    with pytest.raises(ValueError, match=r"frozen part 'encoder': content"):  # a restore checks it too
        restore_workdir(tmp_path / "run")
    restored = restore_workdir(tmp_path / "run", allow_frozen_change=True)
    np.testing.assert_array_equal(np.asarray(restored.extra["encoder"]["proj"]), np.asarray(encoder_init(2, 4)["proj"]))
    assert checkpoint.complete_steps(tmp_path / "run" / "checkpoints") == [2]
    config.train.allow_frozen_change = True
    assert train(config, tmp_path / "run", data=pipeline(config)).step == 4


@pytest.mark.parametrize("make, error, match", [
    (lambda d: os.fspath(d / "missing"), FileNotFoundError, r"model\.toy\.encoder_source=.*missing.*no such directory"),
    (lambda d: write_source(d / "other", {"conv": jnp.ones((3, 3))}), ValueError,
     r"(?s)model\.toy\.encoder_source.*'encoder'.*2 missing:\n    proj\n    table\n  1 unexpected:\n    conv"),
    (lambda d: write_source(d / "bad", {"proj": jnp.ones((64, FEATURES)), "table": jnp.ones((5, FEATURES))}),
     ValueError, r"1 mis-shaped:\n    table: expected \(4, 16\), found \(5, 16\)"),
    (lambda d: (os.makedirs(d / "empty"), os.fspath(d / "empty"))[1], ValueError, r"not a Hugging Face directory"),
])
def test_a_bad_frozen_source_fails_before_anything_is_written(tmp_path, make, error, match):
    config = toy_config(**{"model.toy.encoder_source": make(tmp_path)})
    with pytest.raises(error, match=match):
        train(config, tmp_path / "run", data=pipeline(config))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("copy", [True, False])
def test_a_later_stage_inherits_the_frozen_part(tmp_path, copy):
    """With '' as the source and ``init_from``, the part is the earlier run's: read from its copy
    (``train.frozen_copy``), else from the source that run recorded (here: its seed)."""
    config = toy_config(**{"seed": 3, "train.frozen_copy": copy, "train.steps": 2})
    first = train(config, tmp_path / "a", data=pipeline(config))
    assert (tmp_path / "a" / "frozen" / "encoder" / "params").is_dir() == copy
    later = toy_config(**{"seed": 5, "train.steps": 2, "train.init_from": os.fspath(tmp_path / "a")})
    second = train(later, tmp_path / "b", data=pipeline(later))
    for name in ("proj", "table"):  # seed 3's encoder (the first run's), not seed 5's
        want = np.asarray(encoder_init(3, 4)[name])  # eager; the trainer's is jitted: last-bit differences
        np.testing.assert_array_equal(np.asarray(second.extra_vars["encoder"][name]),
                                      np.asarray(first.extra_vars["encoder"][name]))
        np.testing.assert_allclose(np.asarray(first.extra_vars["encoder"][name]), want, rtol=1e-6, atol=1e-9)
        assert not np.allclose(np.asarray(encoder_init(5, 4)[name]), want)
    stored = checkpoint.read_config_json(tmp_path / "b" / "checkpoints" / "2")["frozen"]["encoder"]
    assert (stored["kind"], stored["source"], stored["seed"]) == (
        ("workdir", os.fspath(tmp_path / "a"), -1) if copy else ("init", "", 3))


def test_init_from_names_every_difference_and_starts_with_declared_new_parts(tmp_path, caplog):
    config = toy_config(**{"train.steps": 2, "model.toy.extra_head": True})
    source = train(config, tmp_path / "a", data=pipeline(config))
    changed = toy_config(**{"train.steps": 2, "train.init_from": os.fspath(tmp_path / "a"),
                            "model.toy.hidden": 6, "model.toy.adapter": True})
    with pytest.raises(ValueError) as info:
        train(changed, tmp_path / "b", data=pipeline(changed))
    message = str(info.value)
    for line in ("1 missing:\n    adapter/kernel", "1 unexpected:\n    extra_head/kernel",
                 "dense/bias: expected (6,), found (8,)", "dense/kernel: expected (16, 6), found (16, 8)",
                 "head/kernel: expected (6,), found (8,)", "train.init_new"):
        assert line in message, message

    new = toy_config(**{"train.steps": 2, "optim.lr": 0.0, "optim.min_lr": 0.0, "model.toy.adapter": True,
                        "train.init_from": os.fspath(tmp_path / "a"), "train.init_new": ["adapter/*"]})
    with pytest.raises(ValueError, match=r"1 unexpected:\n    extra_head/kernel"):
        train(new, tmp_path / "c", data=pipeline(new))  # extra_head is still unexpected
    source_config = toy_config(**{"train.steps": 2})
    train(source_config, tmp_path / "d", data=pipeline(source_config))
    new.train.init_from = os.fspath(tmp_path / "d")
    caplog.set_level("INFO")
    result = train(new, tmp_path / "e", data=pipeline(new))
    assert "1 parameters are new in this stage" in caplog.text and "adapter/kernel" in caplog.text
    from_d = restore_workdir(tmp_path / "d", ema=False).params
    for part in ("dense", "head"):  # lr 0: exactly the source run's
        for leaf in from_d[part]:
            np.testing.assert_array_equal(np.asarray(result.state.params[part][leaf]), np.asarray(from_d[part][leaf]))
    fresh, _ = ToyFamilyTask(new.model.toy).init(jax.random.split(jax.random.key(0))[0])
    np.testing.assert_array_equal(np.asarray(result.state.params["adapter"]["kernel"]),
                                  np.asarray(nn.meta.unbox(fresh)["adapter"]["kernel"]))
    del source


def test_the_ema_covers_only_trainable_leaves(tmp_path):
    config = toy_config(**{"optim.ema_decay": 0.5, "model.toy.freeze_head": True, "train.steps": 2})
    result = train(config, tmp_path / "run", data=pipeline(config))
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    params, ema = result.state.params, result.state.ema_params
    assert size(ema) == size({k: v for k, v in params.items() if k != "head"}) == FEATURES * 8 + 8
    assert ema["head"]["kernel"] is None
    stored = stored_keys(tmp_path / "run" / "checkpoints" / "2", "state")
    assert {k for k in stored if k.startswith("ema_params/")} == {"ema_params/dense/kernel", "ema_params/dense/bias"}
    restored = restore_workdir(tmp_path / "run")  # EMA where averaged, raw params for the frozen head
    np.testing.assert_array_equal(np.asarray(restored.params["head"]["kernel"]), np.asarray(params["head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(restored.params["dense"]["kernel"]), np.asarray(ema["dense"]["kernel"]))
