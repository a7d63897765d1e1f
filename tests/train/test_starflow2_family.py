"""The 'starflow2' family (configs/starflow2.py, train.tasks.starflow2*): the three stages through
`starflow2 train` with init_from, frozen parts, the zero-init invariant on the trained chain, mesh
equivalence, the 7b sizes from abstract shapes, bad input (clear error, nothing written) and
`starflow2 generate` end to end. Tiny sizes; the chain runs once per module (2 steps per stage)."""

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import parallel, pretzel
from starflow2_jax.cli.main import main
from starflow2_jax.config_files import load_config
from starflow2_jax.train import checkpoint as ckpt_lib
from starflow2_jax.train import families
from starflow2_jax.train.loop import resolve_config, train
from starflow2_jax.train.restore import restore_workdir
from starflow2_jax.train.step import model_shardings
from starflow2_jax.train.tasks import starflow2 as sf2
from starflow2_jax.train.tasks import starflow2_data
from starflow2_jax.vlm.text import QwenTextModel

pytestmark = pytest.mark.slow
CONFIG = os.fspath(Path(__file__).resolve().parents[2] / "configs" / "starflow2.py")
FAST = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=0",
        "--config.data.batch_size=8", "--config.train.async_checkpoint=False", "--config.sample.guidance=[0.0]"]


def _config(stage: str, data_dir, **fields):
    overrides = [o[len("--config."):] for o in FAST] + [f"data.data_dir={data_dir}"]
    config = load_config(f"{CONFIG}:tiny,{stage},runlocal", overrides)
    for path, value in fields.items():
        node = config
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage 1 → 2 → 3 through `starflow2 train` (init_from the previous stage); the three workdirs."""
    root = tmp_path_factory.mktemp("sf2")
    data_dir = root / "tfds"
    dirs = {}
    for i, stage in enumerate(sf2.STAGES):
        dirs[stage] = os.fspath(root / stage)
        argv = ["train", "--config", f"{CONFIG}:tiny,{stage},runlocal", "--workdir", dirs[stage],
                f"--config.data.data_dir={data_dir}"] + FAST
        if i:
            argv.append(f"--config.train.init_from={dirs[sf2.STAGES[i - 1]]}")
        assert main(argv) == 0, stage
    dirs["data_dir"] = os.fspath(data_dir)
    return dirs


def _stored(workdir):
    step_dir = ckpt_lib.resolve_step_dir(workdir)
    return step_dir, ckpt_lib.read_config_json(step_dir)


def test_stage_chain_trains_the_parts_of_each_stage(chain):
    params = {}
    for stage in sf2.STAGES:
        step_dir, stored = _stored(chain[stage])
        assert step_dir.name == "2" and stored["model"]["starflow2"]["stage"] == stage
        keys = ckpt_lib.stored_shapes(step_dir / "state")
        params[stage] = {k.split("/")[1] for k in keys if k.startswith("params/")}
        assert not any("vlm" in k.split("/") for k in keys)  # the frozen VLM is never in a step
        assert not (step_dir / "extra").exists()  # every extra var is a frozen part here
    assert params["stage1"] == {"shallow_0", "shallow_1", "deep"}
    assert params["stage2"] == params["stage1"] | {"adapter"}
    assert params["stage3"] == params["stage2"] | {"vlm_to_flow", "flow_to_lm"}
    # the frozen VLM is the same one along the chain (its recorded content fingerprint)
    records = [_stored(chain[s])[1]["frozen"]["vlm"] for s in sf2.STAGES]
    assert len({(r["content"], r["structure"]) for r in records}) == 1


def test_frozen_parts_bitwise_unchanged_and_without_optimiser_state(chain, tmp_path):
    config = _config("stage2", chain["data_dir"], train__init_from=chain["stage1"], train__steps=3)
    result = train(config, tmp_path / "s2")
    before = restore_workdir(chain["stage1"]).params
    cfg = sf2.pretzel_config_from(resolve_config(config))
    for name in ("shallow_0", "shallow_1", "deep"):  # not trained in stage 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params[name]),
                     jax.device_get(before[name]))
    vlm = sf2.random_vlm(cfg.vlm, int(config.seed))  # the '' source: the frozen VLM of the seed
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.extra_vars["vlm"]), jax.device_get(vlm))
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.state.opt_state) if np.ndim(x) > 0)
    adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.state.params["adapter"]))
    assert moments == 2 * adapter  # AdamW's μ and ν of the adapter only
    assert not np.array_equal(jax.device_get(result.state.params["adapter"]["wo"]["kernel"]), 0)  # it trained


def _text_batch(cfg, doc):
    m = 1
    batch = {k: doc[k][None] for k in ("tokens", "positions", "slot", "image_index")}
    batch["segment_ids"] = np.ones_like(batch["tokens"])
    n = len(doc["images"])
    batch["image_valid"] = np.asarray([[True] * n + [False] * (max(m, n) - n)])
    images = np.zeros((1, max(m, n)) + tuple(cfg.latent.image_shape), np.float32)
    images[0, :n] = doc["images"]
    batch["images"] = images
    return batch


def test_zero_init_stage3_from_stages_1_2_is_the_frozen_vlm_and_the_stage1_flow(chain):
    s1, s2 = restore_workdir(chain["stage1"]), restore_workdir(chain["stage2"])
    config3 = resolve_config(_config("stage3", chain["data_dir"]))
    task3 = families.make_task(config3)
    shardings = model_shardings(task3, parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    fresh = jax.jit(lambda k: nn.meta.unbox(task3.init(k)[0]), out_shardings=shardings.params)(jax.random.key(3))
    params3, _ = ckpt_lib.load_params(chain["stage2"], shardings.abstract_params, {}, fresh_params=fresh,
                                      new_patterns=sf2.NEW_PARTS["stage3"])
    cfg1, cfg3, vlm = s1.task.config, task3.config, s2.extra["vlm"]
    rng = np.random.default_rng(0)
    # text: the frozen VLM's own logits (an independent forward of QwenTextModel)
    doc = pretzel.layout_document(cfg3, [rng.integers(32, 127, 20).tolist()])
    batch = _text_batch(cfg3, doc)
    out = pretzel.forward(cfg3, params3, vlm, batch, latent_vars={})
    logits = jax.jit(pretzel.lm_logits, static_argnums=0)(cfg3, params3, vlm, out.y_vlm, out.y_deep)
    expected = QwenTextModel(cfg3.vlm).apply({"params": vlm}, jnp.asarray(batch["tokens"]),
                                             position_ids=jnp.moveaxis(jnp.asarray(batch["positions"]), -1, 0))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)  # another program
    cfg2 = s2.task.config  # the same program without W_D: equal to the bit
    out2 = pretzel.forward(cfg2, s2.params, vlm, batch, latent_vars={})
    logits2 = jax.jit(pretzel.lm_logits, static_argnums=0)(cfg2, s2.params, vlm, out2.y_vlm, out2.y_deep)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
    # caption → image: the stage-1 flow's likelihood of the image
    image = rng.uniform(-1, 1, cfg3.latent.image_shape).astype(np.float32)
    doc = pretzel.layout_document(cfg3, [starflow2_data.ByteTokenizer().encode("a digit seven"), image])
    batch = _text_batch(cfg3, doc)
    nll1 = pretzel.image_nll(cfg1, pretzel.forward(cfg1, s1.params, s1.extra["vlm"], batch, latent_vars={}))
    nll3 = pretzel.image_nll(cfg3, pretzel.forward(cfg3, params3, vlm, batch, latent_vars={}))
    assert np.isfinite(np.asarray(nll1)).all()
    np.testing.assert_array_equal(np.asarray(nll3), np.asarray(nll1))


def _loss_and_grads(task, params, extra, batch, mesh):
    shardings = model_shardings(task, mesh)
    params = jax.device_put(params, shardings.params)
    extra = jax.device_put(extra, shardings.extra)
    batch = parallel.shard_batch(batch, mesh)
    fn = jax.jit(jax.value_and_grad(lambda p, e, b: task.loss(p, e, b, jax.random.key(5)), has_aux=True))
    with parallel.activation_rules(mesh, task.rules):
        (loss, metrics), grads = fn(params, extra, batch)
    return jax.device_get((loss, metrics, grads))


def test_loss_and_gradients_on_a_2x2x2_mesh_equal_one_device(chain):
    config = resolve_config(_config("stage3", chain["data_dir"], data__batch_size=4,
                                    model__starflow2__caption_dropout=0.5))
    task = families.make_task(config)
    batch = task.prepare_batch(next(iter(starflow2_data.make_train_data(config, chain["data_dir"], task.config))))
    assert batch["image_valid"].any() and batch["text_loss"].any()
    params = nn.meta.unbox(task.init(jax.random.key(0))[0])
    leaves, tree = jax.tree.flatten(params)  # every zero-initialised part active
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    extra = {"vlm": sf2.random_vlm(task.config.vlm, 0)}
    one = _loss_and_grads(task, params, extra, batch, parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                                         jax.devices()[:1]))
    many = _loss_and_grads(task, params, extra, batch, parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert float(one[1]["loss_nf"]) != 0 and float(one[1]["loss_ntp"]) != 0
    np.testing.assert_allclose(many[0], one[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), many[2], one[2])


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


@pytest.mark.parametrize("tower", [False, True])
def test_7b_stage3_builds_from_abstract_shapes(tower):
    config = load_config(f"{CONFIG}:7b,stage3", [f"model.starflow2.vision_tower={tower}"])
    config = resolve_config(config)
    task = families.make_task(config)
    params, extra = jax.eval_shape(task.init, jax.random.key(0))
    assert abs(_count(params) / 1e9 - 3.6) <= 0.1
    frozen = _count(extra["vlm"]) + (_count(extra["vlm_vision"]) if tower else 0)
    assert round(frozen / 1e9, 2) == (8.29 if tower else 7.62)
    assert ("vlm_vision" in extra) == tower and "latent" in extra
    assert [p.name for p in families.get("starflow2").frozen_parts(config)] == \
        ["vlm"] + (["vlm_vision"] if tower else []) + ["latent"]


# ---- bad input: a clear error, nothing written --------------------------------------------------
def _write_png(path, size=8):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(path)


def _assert_fails_cleanly(config, workdir, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(config, workdir)
    assert not os.path.exists(workdir)


def test_bad_input_image_where_the_config_expects_none(chain, tmp_path):
    config = _config("stage1", chain["data_dir"], model__starflow2__max_images=0)
    _assert_fails_cleanly(config, tmp_path / "run", r"config expects none \(max_images=0\)")


def test_bad_input_more_images_than_a_row_holds(tmp_path):
    for k in range(5):
        _write_png(tmp_path / f"{k}.png")
    lines = [[{"text": "five digits"}] + [{"image": f"{k}.png"} for k in range(5)]]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    config = _config("stage1", tmp_path / "tfds", data__builder="interleaved",
                     data__source=os.fspath(tmp_path / "docs.jsonl"), data__batch_size=8)
    _assert_fails_cleanly(config, tmp_path / "run", r"holds 5 images; a row holds at most max_images=4")


def test_bad_input_stage_checkpoint_that_does_not_fit(chain, tmp_path):
    config = _config("stage3", chain["data_dir"], train__init_from=chain["stage1"])  # stage 2's adapter missing
    _assert_fails_cleanly(config, tmp_path / "run", r"(?s)do not match.*missing.*adapter")


def test_bad_input_vlm_source_of_another_architecture(chain, tmp_path):
    source = tmp_path / "llama"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (source / "model.safetensors").write_bytes(b"")
    config = _config("stage1", chain["data_dir"], model__starflow2__vlm_checkpoint=os.fspath(source))
    _assert_fails_cleanly(config, tmp_path / "run", r"model.starflow2.vlm_checkpoint=.*model_type='llama'")
    code = main(["train", "--config", f"{CONFIG}:tiny,stage1,runlocal", "--workdir", os.fspath(tmp_path / "cli"),
                 f"--config.model.starflow2.vlm_checkpoint={source}", f"--config.data.data_dir={chain['data_dir']}"]
                + FAST)
    assert code == 2 and not (tmp_path / "cli" / "checkpoints").exists()


# ---- starflow2 generate -------------------------------------------------------------------------
def test_generate_text_to_image_writes_pngs_and_an_html_transcript(chain, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--workdir", chain["stage3"], "--mode", "t2i", "--prompt", "a digit seven",
                 "--num", "2", "--guidance", "2", "--out", os.fspath(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["generated_images"] == 2
    for k in range(2):
        assert np.asarray(Image.open(out / f"image_{k}.png")).shape == (8, 8)  # the digits' grey 8×8
    html = (out / "transcript.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "a digit seven" in html


def test_generate_image_to_text_and_interleaved(chain, tmp_path, capsys):
    _write_png(tmp_path / "in.png", 16)
    assert main(["generate", "--workdir", chain["stage3"], "--mode", "i2t", "--image", os.fspath(tmp_path / "in.png"),
                 "--prompt", "which digit?", "--max-new-tokens", "6", "--out", os.fspath(tmp_path / "i2t")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["generated_texts"]) == 1
    assert (tmp_path / "i2t" / "text.txt").read_text().strip() == summary["generated_texts"][0].strip()
    assert main(["generate", "--workdir", chain["stage3"], "--mode", "interleaved", "--prompt", "hi",
                 "--max-new-tokens", "6", "--temperature", "1.0", "--out", os.fspath(tmp_path / "mix")]) == 0
    assert (tmp_path / "mix" / "transcript.html").exists()


def test_generate_bad_input_names_the_value_and_writes_nothing(chain, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--workdir", chain["stage3"], "--mode", "t2i", "--prompt", "x" * 100,
                 "--out", os.fspath(out)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # (the random frozen VLM's warning may come first)
    assert code == 2 and line.startswith("starflow2 generate: error: ") and "100 tokens long" in line
    assert "maximum length is 64" in line
    assert not out.exists()
    code = main(["generate", "--workdir", chain["stage3"], "--mode", "edit", "--out", os.fspath(out)])
    assert code == 2 and "needs at least one --image" in capsys.readouterr().err and not out.exists()
