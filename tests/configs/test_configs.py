"""Every config file and preset loads and validates; the loader's presets and overrides.

The TarFlow presets are checked against the parameter counts of the PyTorch reference models
(TORCH_LAYOUTS.md §7.5, counted by running ml-tarflow), computed here from abstract shapes only.
"""

from __future__ import annotations

import glob
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from starflow2_jax.config_files import ConfigError, load_config, parse_preset, split_override_args
from starflow2_jax.train import FlowTask, validate
from starflow2_jax.train.families import make_task as task_from_config
from starflow2_jax.train.loop import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
DATA_DIR_OVERRIDE = "data.data_dir=/datasets/prepared"  # 'directory' presets need one to validate


def _module_presets(path: str) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_presets_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(getattr(module, "PRESETS", ())) or [None]


ALL_PRESETS = [(os.path.basename(f), p) for f in CONFIG_FILES for p in _module_presets(f)]


def test_config_files_exist():
    assert {os.path.basename(f) for f in CONFIG_FILES} >= {"demo.py", "tarflow.py", "fae.py"}


@pytest.mark.parametrize("name,preset", ALL_PRESETS, ids=[f"{n}:{p}" for n, p in ALL_PRESETS])
def test_every_preset_loads_validates_and_builds_its_task(name, preset):
    spec = f"configs/{name}" + (f":{preset}" if preset else "")
    config = load_config(spec)
    if config.data.builder == "directory":
        with pytest.raises(ValueError, match="data.data_dir"):
            validate(config)
        config = load_config(spec, [DATA_DIR_OVERRIDE])
    validate(config)
    task = task_from_config(resolve_config(config))  # the factory accepts the kwargs
    if config.model.family == "flow":
        assert task.conditioning == config.model.conditioning
    elif config.model.family == "fae":
        params, extra = jax.eval_shape(task.init, jax.random.key(0))  # shapes only: no memory for g/14
        assert set(params) == {"encoder", "feature_decoder", "pixel_decoder", "discriminator"}
    elif config.model.family == "lm":  # the Qwen2.5-VL text decoder, with its vision tower when it reads digits
        params, extra = jax.eval_shape(task.init, jax.random.key(0))
        text = {"embed_tokens", "layers", "final_norm", "lm_head"}
        if config.model.lm.images == "digits":
            assert set(params) == {"text", "vision"} and set(params["text"]) == text and not extra
            assert set(params["vision"]) == {"patch_embed", "layers", "merger"}
        else:
            assert set(params) == text and not extra
    else:  # starflow2: the stage's switches decide which trainable parts exist (SPEC §5.1)
        params, extra = jax.eval_shape(task.init, jax.random.key(0))  # shapes only: no memory for 7b
        stage = config.model.starflow2.stage
        expected = {"deep"} | {k for k in params if k.startswith("shallow_")}
        expected |= {"adapter"} if stage in ("stage2", "stage3") else set()
        expected |= {"vlm_to_flow", "flow_to_lm"} if stage == "stage3" else set()
        assert any(k.startswith("shallow_") for k in params) and set(params) == expected
        assert task.image_temperature == config.sample.image_temperature  # what its sample grids draw at


def _num_params(config) -> int:
    task = FlowTask.from_config(resolve_config(config))
    params, _ = jax.eval_shape(task.init, jax.random.key(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(params)))


@pytest.mark.parametrize("preset,millions", [
    ("imagenet64_uncond", 460.14), ("imagenet128", 823.93), ("afhq256", 463.48),
    # the conditional ImageNet-64 run: the unconditional model + a (1000, 768) class table per block
    ("imagenet64", 460.14 + 8 * 1000 * 768 / 1e6),
])
def test_tarflow_presets_match_the_reference_model_sizes(preset, millions):
    config = load_config(f"configs/tarflow.py:{preset}", [DATA_DIR_OVERRIDE])
    assert _num_params(config) / 1e6 == pytest.approx(millions, abs=0.006)


def test_tarflow_presets_follow_the_readme_recipes():
    c = load_config("configs/tarflow.py:imagenet128", [DATA_DIR_OVERRIDE])
    assert (c.data.noise, c.data.noise_std, c.data.batch_size, c.data.levels) == ("gaussian", 0.15, 768, 255)
    assert (c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.optim.clip_norm, c.optim.ema_decay) == (
        1e-4, 1e-6, 1e-4, 0.0, 0.0)
    assert c.optim.warmup_steps == 1_281_167 // 768 and c.train.steps == 320 * (1_281_167 // 768)
    assert (c.model.flow.dtype, c.model.flow.remat, c.mesh.data) == ("bfloat16", "dots", -1)
    uncond = load_config("configs/tarflow.py:imagenet64_uncond", [DATA_DIR_OVERRIDE])
    assert uncond.model.conditioning == "none" and uncond.data.label_drop == 0.0
    afhq = load_config("configs/tarflow.py:afhq256", [DATA_DIR_OVERRIDE])
    assert (afhq.model.flow.kwargs.num_classes, afhq.data.noise_std, afhq.model.flow.kwargs.patch_size) == (3, 0.07, 8)


def test_demo_config_is_the_measured_recipe():
    c = load_config("configs/demo.py")
    kw = c.model.flow.kwargs
    assert (c.model.flow.factory, c.model.conditioning) == ("starflow", "label")
    assert (kw.in_channels, kw.img_size, kw.patch_size, kw.channels, kw.top_block_channels, list(kw.layers_per_block),
            kw.head_dim, kw.num_classes) == (1, 8, 2, 64, 96, [1, 1, 1, 1, 1, 2], 32, 10)
    assert (c.data.builder, c.data.levels, c.data.noise, c.data.label_drop, c.data.batch_size) == (
        "digits", 16, "uniform", 0.1, 64)
    o = c.optim
    assert (o.lr, o.warmup_steps, o.min_lr, o.b1, o.b2, o.weight_decay, o.clip_norm, o.ema_decay) == (
        1e-3, 200, 1e-5, 0.9, 0.95, 0.1, 1.0, 0.99)
    t = c.train
    assert (t.steps, t.checkpoint_every, t.sample_every, t.log_every) == (3000, 1000, 1000, 100)
    assert (list(c.sample.guidance), c.sample.per_class) == ([0.0, 2.0], 8)
    caption = load_config("configs/demo.py:caption")
    assert caption.model.conditioning == "caption" and "num_classes" not in caption.model.flow.kwargs
    assert load_config("configs/demo.py:label").to_dict() == c.to_dict()
    assert load_config("configs/demo.py:runlocal").train.steps < 10


def test_image_temperature_of_the_presets():
    """The STARFlow2 digits demo draws at 0.6 (the measured setting, configs/starflow2.py's docstring),
    runlocal included; tiny and 7b at 1.0; a family other than starflow2 refuses anything but 1.0 at
    validation (before a task exists), naming the field."""
    for stage in ("stage1", "stage2", "stage3"):
        assert load_config(f"configs/starflow2.py:demo,{stage}").sample.image_temperature == 0.6
        assert load_config(f"configs/starflow2.py:tiny,{stage}").sample.image_temperature == 1.0
        assert load_config(f"configs/starflow2.py:7b,{stage}").sample.image_temperature == 1.0
    assert load_config("configs/starflow2.py:demo,stage3,runlocal").sample.image_temperature == 0.6
    for spec in ("configs/demo.py", "configs/fae.py", "configs/lm.py"):
        config = load_config(spec, ["sample.image_temperature=0.5"])
        with pytest.raises(ValueError, match=rf"sample\.image_temperature=0\.5: only model\.family in "
                                             rf"\('starflow2',\).*\(model\.family is '{config.model.family}'"):
            validate(config)
    for bad in ("0", "-0.5"):  # on a starflow2 config: the range itself
        with pytest.raises(ValueError, match=rf"sample\.image_temperature={float(bad)}: expected a number > 0"):
            validate(load_config("configs/starflow2.py:tiny,stage1", [f"sample.image_temperature={bad}"]))
    with pytest.raises(ConfigError, match=r"sample\.image_temperature='warm': expected a float"):
        load_config("configs/starflow2.py:demo,stage3", ["sample.image_temperature=warm"])


def test_unknown_preset_and_missing_file_are_named():
    with pytest.raises(ConfigError, match=r"demo\.py.*'nope'.*label"):
        load_config("configs/demo.py:nope")
    with pytest.raises(ConfigError, match=r"tarflow\.py.*no preset given"):
        load_config("configs/tarflow.py")
    with pytest.raises(ConfigError, match=r"configs/missing\.py.*not found"):
        load_config("configs/missing.py:label")
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_preset("label,caption", ("label", "caption"), default="label")


def test_config_files_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.py:caption").model.conditioning == "caption"
    own = tmp_path / "mine.py"
    own.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'a': 1})\n")
    assert load_config(str(own)).a == 1
    with pytest.raises(ConfigError, match=r"mine\.py' takes no preset, got 'x'"):
        load_config(f"{own}:x")


def test_overrides_are_parsed_by_the_field_type():
    c = load_config("configs/demo.py", [
        "train.steps=10", "optim.lr=3e-4", "optim.warmup_steps=2", "train.async_checkpoint=false", "data.noise=none",
        "sample.guidance=0,1.5", "model.flow.kwargs.layers_per_block=[2,2]", "sample.prompts=['a one']",
        "model.flow.kwargs.top_block_channels=96", "model.text.vocab=('a','b')"])
    assert (c.train.steps, c.optim.lr, c.train.async_checkpoint, c.data.noise) == (10, 3e-4, False, "none")
    assert c.sample.guidance == [0.0, 1.5] and all(isinstance(g, float) for g in c.sample.guidance)
    assert list(c.model.flow.kwargs.layers_per_block) == [2, 2]
    assert tuple(c.sample.prompts) == ("a one",) and tuple(c.model.text.vocab) == ("a", "b")
    assert c.model.flow.kwargs.top_block_channels == 96  # free-form factory kwargs accept new keys
    assert load_config("configs/demo.py", ["optim.lr=1"]).optim.lr == 1.0  # int text for a float field


@pytest.mark.parametrize("override,pattern", [
    ("train.stepz=5", r"unknown field 'train\.stepz'"),
    ("nope.steps=5", r"unknown field 'nope'"),
    ("train.steps=abc", r"train\.steps='abc': expected an int"),
    ("train.steps=1.5", r"train\.steps='1\.5': expected an int"),
    ("optim.lr=fast", r"optim\.lr='fast': expected a float"),
    ("train.async_checkpoint=maybe", r"train\.async_checkpoint='maybe': expected a bool"),
    ("sample.guidance=fast", r"sample\.guidance='fast': expected a list"),
    ("model.flow.kwargs.layers_per_block=[1.5]", r"layers_per_block.*expected a list of int"),
    ("optim=1", r"optim: is a group of fields"),
    ("train.steps", r"expected --config\.FIELD=VALUE"),
])
def test_bad_overrides_name_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/demo.py", [override])


def test_override_arguments_in_both_spellings():
    overrides, rest = split_override_args(["--config.train.steps=5", "--config.optim.lr", "0.1", "--other"])
    assert overrides == ["train.steps=5", "optim.lr=0.1"] and rest == ["--other"]
    with pytest.raises(ConfigError, match="missing value"):
        split_override_args(["--config.train.steps"])
