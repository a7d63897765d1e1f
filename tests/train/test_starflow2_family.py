"""The 'starflow2' family (configs/starflow2.py, train.tasks.starflow2*): the three stages through
`starflow2 train` with init_from, frozen parts, the zero-init invariant on the trained chain, mesh
equivalence, the 7b sizes from abstract shapes, bad input (clear error, nothing written),
`starflow2 generate`, `starflow2 sample` and `starflow2 eval bpd` end to end. Tiny sizes; the chain
runs once per module (2 steps per stage)."""

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
from starflow2_jax.train.generate import sample_from_workdir
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


def test_generate_draws_at_the_image_temperature(chain, tmp_path, capsys, monkeypatch):
    """t2i and interleaved draw at --image-temperature, by default at the run's sample.image_temperature
    (the chain's run is given 0.7 here, as its stored config would hold it); the t2i images are those of
    pretzel.text_to_image at that temperature, written out here, and not those at T = 1."""
    from starflow2_jax.eval import generate as eval_generate
    from starflow2_jax.train import restore as restore_lib

    real_restore = restore_lib.restore_workdir

    def restore_at_07(*args, **kwargs):
        restored = real_restore(*args, **kwargs)
        restored.config.sample.image_temperature = 0.7
        return restored

    seen = []

    def recording(fn):
        def call(*args, **kwargs):
            seen.append((fn.__name__, kwargs["image_temperature"]))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(restore_lib, "restore_workdir", restore_at_07)
    monkeypatch.setattr(pretzel, "text_to_image", recording(pretzel.text_to_image))
    monkeypatch.setattr(pretzel, "interleaved", recording(pretzel.interleaved))
    t2i = ["generate", "--workdir", chain["stage3"], "--mode", "t2i", "--prompt", "a digit seven", "--num", "2",
           "--seed", "3"]
    assert main(t2i + ["--out", os.fspath(tmp_path / "default")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_temperature"] == 0.7
    assert main(t2i + ["--image-temperature", "0.5", "--out", os.fspath(tmp_path / "half")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_temperature"] == 0.5
    assert main(["generate", "--workdir", chain["stage3"], "--mode", "interleaved", "--prompt", "hi",
                 "--max-new-tokens", "4", "--image-temperature", "0.25", "--out", os.fspath(tmp_path / "mix")]) == 0
    assert seen == [("text_to_image", 0.7), ("text_to_image", 0.5), ("interleaved", 0.25)]
    monkeypatch.undo()
    restored = restore_workdir(chain["stage3"])
    doc = eval_generate._prompt_document(restored.task, "a digit seven", [])

    def oracle(temperature):
        images = pretzel.text_to_image(restored.task.config, restored.params, restored.extra["vlm"], {}, doc,
                                       rng=jax.random.fold_in(jax.random.key(3), 0), num_samples=2,
                                       image_temperature=temperature)["images"]
        return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)[..., 0]

    written = np.stack([np.asarray(Image.open(tmp_path / "half" / f"image_{k}.png")) for k in range(2)])
    np.testing.assert_allclose(written, oracle(0.5), atol=1, rtol=0)
    assert np.abs(written.astype(int) - oracle(1.0)).max() > 2


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


# ---- starflow2 sample / eval bpd on starflow2 runs ----------------------------------------------
def test_sample_draws_a_text_to_image_grid_at_each_guidance(chain, tmp_path, capsys):
    """`starflow2 sample` on a stage-3 run: the PNG / .npz / JSON of the config's prompts (one row each at
    the run's single guidance), each row the model's text → image for its prompt and seed; with two
    weights in sample.guidance, one row per (weight, prompt), the guided rows those of guidance 2."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", chain["stage3"], "--out", os.fspath(out), "--num", "2", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    restored = restore_workdir(chain["stage3"])
    prompts = list(restored.config.sample.prompts)
    assert summary["grid"] == [len(prompts), 2] and summary["guidance"] == [0.0] * len(prompts)
    assert summary["conditioning"] == "text" and summary["prompts"] == prompts
    assert summary["image_temperature"] == restored.config.sample.image_temperature == 1.0
    with np.load(tmp_path / "grid.npz") as npz:
        samples, stored_prompts = npz["samples"], npz["prompts"].tolist()
    assert samples.shape == (2 * len(prompts), 8, 8, 1) and stored_prompts == [p for p in prompts for _ in "ab"]
    assert json.loads((tmp_path / "grid.json").read_text())["grid"] == summary["grid"]
    assert Image.open(out).size[0] >= 2 * 64
    cfg, vlm = restored.task.config, restored.extra["vlm"]
    encode = starflow2_data.ByteTokenizer().encode

    def oracle(i, prompt, guidance, num, image_temperature=1.0):
        doc = pretzel.layout_document(cfg, [prompt], encode=encode)
        images = pretzel.text_to_image(cfg, restored.params, vlm, {}, doc, rng=jax.random.fold_in(jax.random.key(3), i),
                                       num_samples=num, guidance=guidance,
                                       image_temperature=image_temperature)["images"]
        return np.clip(np.asarray(images), -1, 1)

    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(samples[2 * i:2 * i + 2], oracle(i, prompt, 0.0, 2), atol=1e-5, rtol=0)
    restored.config.sample.guidance = [0.0, 2.0]
    two = sample_from_workdir(chain["stage3"], tmp_path / "two.png", restored=restored, num=1, seed=3)
    assert two["grid"] == [2 * len(prompts), 1] and two["guidance"] == [0.0] * len(prompts) + [2.0] * len(prompts)
    with np.load(tmp_path / "two.npz") as npz:
        rows = npz["samples"]
    k = len(prompts)
    np.testing.assert_allclose(rows[k + 1], oracle(1, prompts[1], 2.0, 1)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(rows[1], oracle(1, prompts[1], 0.0, 1)[0], atol=1e-5, rtol=0)
    assert np.max(np.abs(rows[k:] - rows[:k])) > 1e-3  # guidance acts (same noise per prompt)
    # the task a run with sample.image_temperature 0.5 builds draws its grids at 0.5
    restored.config.sample.image_temperature = 0.5
    cooler = restored._replace(task=families.make_task(restored.config))
    half = sample_from_workdir(chain["stage3"], tmp_path / "half.png", restored=cooler, num=1, seed=3)
    assert half["image_temperature"] == 0.5
    with np.load(tmp_path / "half.npz") as npz:
        np.testing.assert_allclose(npz["samples"][k + 1], oracle(1, prompts[1], 2.0, 1, 0.5)[0], atol=1e-5, rtol=0)
        assert np.max(np.abs(npz["samples"][k + 1] - rows[k + 1])) > 1e-3


def _padded_rows(cfg, docs):
    """Each document alone in a row of cfg.seq_len positions (written out here, not data.packing)."""
    length, m = cfg.seq_len, cfg.max_images
    rows = []
    for doc in docs:
        t, k = len(doc["tokens"]), len(doc["images"])
        row = dict(tokens=np.zeros(length, np.int32), positions=np.zeros((length, 3), np.int32),
                   slot=np.zeros(length, bool), image_index=np.full(length, -1, np.int32),
                   text_loss=np.zeros(length, bool), segment_ids=np.zeros(length, np.int32),
                   images=np.zeros((m,) + tuple(cfg.latent.image_shape), np.float32),
                   image_target=np.zeros(m, bool), image_valid=np.arange(m) < k)
        for name in ("tokens", "positions", "slot", "image_index", "text_loss"):
            row[name][:t] = doc[name]
        row["segment_ids"][:t] = 1
        row["images"][:k], row["image_target"][:k] = doc["images"], doc["image_target"]
        rows.append(row)
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def test_eval_bpd_equals_the_model_likelihood_of_each_document(chain, tmp_path, capsys):
    """`starflow2 eval bpd` on a stage-3 run: bits/dim per image and the text NLL per token equal an
    independent computation on the same dequantised documents — each alone in a hand-padded row,
    −log p from ``pretzel.image_nll`` (−log N(z) − log|det J|), the text NLL from the full logits."""
    from starflow2_jax.data.documents import DocumentPreprocess
    from starflow2_jax.train.tasks import starflow2_eval

    out = tmp_path / "bpd.json"
    assert main(["eval", "bpd", "--workdir", chain["stage3"], "--out", os.fspath(out)]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    restored = restore_workdir(chain["stage3"])
    cfg, levels = restored.task.config, int(restored.config.data.levels)
    source = starflow2_data.make_source(restored.config, "test", chain["stage3"])
    layout = starflow2_data.LayoutPreprocess(cfg, DocumentPreprocess(levels=levels, noise="uniform",
                                                                     random_caption=False),
                                             starflow2_data.ByteTokenizer().encode, pairs="t2i")
    docs = [layout(source[i], np.random.default_rng([0, 0, i])) for i in range(len(source))]
    batch = _padded_rows(cfg, docs)
    vlm = restored.extra["vlm"]
    output = pretzel.forward(cfg, restored.params, vlm, batch, latent_vars={})
    dims = cfg.num_slots * cfg.latent_dim
    assert dims == int(np.prod(cfg.latent.image_shape))  # patch latents: the pixels' dimensions
    nll = np.asarray(pretzel.image_nll(cfg, output))[:, 0]  # a pair: its one image, a generation target
    expected = (nll / dims + np.log(levels / 2)) / np.log(2)
    assert result["num_images"] == len(docs) == result["num_documents"]
    np.testing.assert_allclose(result["bits_per_dim"], expected.mean(), rtol=1e-5)
    scores = starflow2_eval.score_bpd(restored, chain["stage3"], split="test")
    np.testing.assert_array_equal(scores.indices, np.arange(len(docs)) * cfg.max_images)
    np.testing.assert_allclose(scores.values, expected, rtol=0, atol=1e-4)
    logits = jax.jit(pretzel.lm_logits, static_argnums=0)(cfg, restored.params, vlm, output.y_vlm, output.y_deep)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nxt = np.concatenate([batch["tokens"][:, 1:], np.zeros_like(batch["tokens"][:, :1])], axis=1)
    picked = np.take_along_axis(np.asarray(logp), nxt[..., None], axis=-1)[..., 0]
    tokens = int(batch["text_loss"].sum())
    assert result["text_tokens"] == tokens > 0
    np.testing.assert_allclose(result["text_nll_per_token"], -picked[batch["text_loss"]].sum() / tokens, rtol=1e-5)


def test_sample_and_eval_bad_input_on_starflow2_runs(chain, tmp_path, capsys):
    from starflow2_jax.train.tasks import starflow2_eval

    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", chain["stage3"], "--out", os.fspath(out), "--label", "3"]) == 2
    assert "--label 3" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert main(["eval", "fae", "--workdir", chain["stage3"]]) == 2
    err = capsys.readouterr().err
    assert "does not apply" in err and "model.family='starflow2'" in err and "['sample', 'eval bpd']" in err
    result = tmp_path / "bpd.json"
    assert main(["eval", "bpd", "--workdir", chain["stage3"], "--split", "nosuch", "--out", os.fspath(result)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("starflow2 eval bpd: error: --split 'nosuch'") and not result.exists()
    config = restore_workdir(chain["stage3"]).config
    config.model.starflow2.latent.kind = "fae"
    with pytest.raises(ValueError, match=r"latent.kind='fae'.*nll_per_dim"):
        starflow2_eval.check_bpd(config, chain["stage3"])
