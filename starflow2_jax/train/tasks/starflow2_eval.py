"""``starflow2 sample`` and ``starflow2 eval bpd`` for STARFlow2 runs: the 'starflow2' family's hooks
(``train.family``: ``draw_samples``, ``bpd_scorer``).

sample (``draw_samples``): text → image for the run's ``sample.prompts`` (or ``--prompt``), a grid with
one row per (guidance, prompt) — every weight of ``sample.guidance``, or ``--guidance`` alone — and
``sample.per_class`` (or ``--num``) columns, through ``Starflow2Task.sample_grid`` (``pretzel.text_to_image``:
Gaussian guidance on the deep stream, the run's ``sample.jacobi`` or ``--jacobi``, the run's
``sample.image_temperature``, recorded in the summary). Every guidance
row of a prompt uses the same noise (seed ``--seed``). The empty prompt is drawn unguided.

eval bpd (``BPD``): every document of the split laid out as in training with image–text pairs as
caption → image (the image a generation target given its caption; interleaved documents as stored),
one document per row (``model.starflow2.seq_len`` positions), images resized to ``data.image_size`` as in
training and dequantised with fresh uniform noise ``x + (u − ½)·(2/levels)`` per pixel and pass (numpy
``default_rng([seed, pass, document])``), then:

    bits/dim of a target image = (−log p(x_deq | its context) / (N·D) + log(levels / 2)) / log 2

with −log p the exact likelihood through the shallow flows and the deep stream (``pretzel.image_nll``;
N·D = H·W·C for patch latents): the flow family's definition (``eval.bpd``). Reported per image (the
mean over passes), and the text NLL per token (nats) over the trained text positions of all documents
and passes (``text_nll_per_token``, ``text_tokens``). Defined for patch latents only (an FAE's latents
have no pixel likelihood).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from starflow2_jax import parallel, pretzel
from starflow2_jax.train.family import Drawn, Scorer, Scores
from starflow2_jax.train.tasks import starflow2_data


# ---- sample ---------------------------------------------------------------------------------------
def _jacobi_dict(jacobi):
    """``flow.JacobiOptions`` / dict / None → what ``pretzel.text_to_image`` reads."""
    if jacobi is None or isinstance(jacobi, dict):
        return jacobi
    return dict(block_size=int(jacobi.block_size), threshold=float(jacobi.threshold), max_iters=int(jacobi.max_iters))


def draw_samples(restored, *, label=None, prompt: str | None = None, guidance: float | None = None,
                 jacobi="config", num: int | None = None, seed: int = 0, batch_size: int = 256) -> Drawn:
    """The grid of the module docstring from a restored starflow2 run. ``guidance`` None: every weight
    of the run's ``sample.guidance``; ``jacobi`` 'config': the run's ``sample.jacobi``. All rows of one
    guidance are drawn in lockstep (``batch_size`` is not used). ValueError naming a bad argument."""
    del batch_size
    task = restored.task
    if label is not None:
        raise ValueError(f"--label {label}: the model in {restored.step_dir} is a STARFlow2 run, conditioned on "
                         f"text (use --prompt)")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt '': expected a non-empty prompt (the config's prompts are the default; guidance "
                         "already uses the empty prompt)")
    prompts = [prompt] if prompt is not None else task.grid_rows()
    weights = [float(w) for w in restored.config.sample.guidance] if guidance is None else [float(guidance)]
    if not weights:
        raise ValueError(f"sample.guidance of {restored.step_dir} is empty: give --guidance")
    jac = task.jacobi if isinstance(jacobi, str) and jacobi == "config" else _jacobi_dict(jacobi)
    per_prompt = int(num) if num is not None else task.per_prompt
    rng = jax.random.key(int(seed))
    blocks, names, row_prompts, row_guidance = [], [], [], []
    for w in weights:
        grid = task.sample_grid(restored.params, restored.extra, rng, guidance=w, prompts=prompts,
                                per_prompt=per_prompt, jacobi=jac)
        blocks.append(np.asarray(jax.device_get(grid.images), np.float32))
        for p in prompts:
            used = w if p else 0.0  # the empty prompt has no unconditional branch to guide away from
            names.append(f"{p or '(empty prompt)'} · guidance {used:g}")
            row_prompts.append(p)
            row_guidance.append(used)
    summary = dict(conditioning="text", guidance_weights=weights, prompts=list(prompts), jacobi=jac,
                   per_prompt=per_prompt, image_temperature=task.image_temperature)
    return Drawn(images=np.concatenate(blocks), row_names=names, row_prompts=row_prompts, row_guidance=row_guidance,
                 summary=summary)


# ---- eval bpd -------------------------------------------------------------------------------------
def check_bpd(config, workdir) -> None:
    """ValueError unless the run models pixel patches (bits/dim needs a pixel likelihood)."""
    kind = config.model.starflow2.latent.kind
    if kind != "patches":
        raise ValueError(f"bits/dim is defined for STARFlow2 on pixel patches; {os.fspath(workdir)!r} is a "
                         f"model.family='starflow2' run with model.starflow2.latent.kind={kind!r} (its training "
                         f"metrics report nll_per_dim instead)")


def _split_source(config, split: str, workdir):
    from starflow2_jax.data.check import DatasetError

    try:
        return starflow2_data.make_source(config, split, workdir)
    except DatasetError:
        raise
    except (KeyError, ValueError, AssertionError) as error:
        if split not in str(error):
            raise
        raise ValueError(f"--split {split!r}: the dataset of {os.fspath(workdir)!r} has no such split "
                         f"({error})") from None


def _score_fn(config: pretzel.PretzelConfig, levels: int, mesh):
    """The jitted per-row scores: ``(bits/dim (B, M), target images (B, M), text NLL sum (B,), trained
    tokens (B,))``, replicated on every device (every process reads them whole)."""
    shift = math.log(levels / 2.0)

    def score(params, vlm_params, latent_vars, batch):
        terms = pretzel.per_example(config, params, vlm_params, batch, latent_vars=latent_vars, ntp_weight=1.0)
        nll_per_dim = terms["nf"] + 0.5 * math.log(2 * math.pi)  # nf: (½‖z‖² − log|det J|) / (N·D)
        bpd = (nll_per_dim + shift) / math.log(2.0)
        return (jnp.where(terms["nf_mask"], bpd, 0.0), terms["nf_mask"], jnp.sum(terms["ntp"], axis=1),
                jnp.sum(terms["ntp_mask"], axis=1))

    return jax.jit(score, out_shardings=NamedSharding(mesh, PartitionSpec()))


def document_rng(seed: int, pass_index: int, document: int) -> np.random.Generator:
    """The dequantisation noise of one document in one pass (see the module docstring)."""
    return np.random.default_rng([int(seed), int(pass_index), int(document)])


def score_bpd(restored, workdir, *, split: str, num_samples: int = 1, seed: int = 0,
              batch_size: int | None = None) -> Scores:
    """Per-image bits/dim and the text NLL per token of ``split`` (module docstring). Image indices are
    ``document · max_images + k`` (k: the image's place among its row's images)."""
    from starflow2_jax.data.documents import DocumentPreprocess
    from starflow2_jax.data.packing import pack_documents

    config, task, mesh = restored.config, restored.task, restored.mesh
    check_bpd(config, workdir)
    batch_size = int(batch_size if batch_size is not None else config.data.batch_size)
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES) * jax.process_count()
    if batch_size < 1 or batch_size % shards:
        raise ValueError(f"--batch-size {batch_size}: must be a positive multiple of the {shards} batch shards here")
    source = _split_source(config, split, workdir)
    count = len(source)
    if not count:
        raise ValueError(f"--split {split!r} is empty")
    pcfg, levels = task.config, int(config.data.levels)
    layout = starflow2_data.LayoutPreprocess(
        pcfg, DocumentPreprocess(levels=levels, noise="uniform", random_caption=False,
                                 image_size=int(config.data.image_size), channels=int(config.data.channels)),
        task.encode, pairs="t2i")
    spec = starflow2_data.packing_spec(pcfg)
    score = _score_fn(pcfg, levels, mesh)
    local = batch_size // jax.process_count()
    first = jax.process_index() * local
    sums: dict[int, float] = {}
    nll_total, tokens_total = 0.0, 0
    for pass_index in range(int(num_samples)):
        for start in range(0, count, batch_size):
            ids = [min(i, count - 1) for i in range(start + first, start + first + local)]
            rows = [pack_documents([layout(source[i], document_rng(seed, pass_index, i))], spec) for i in ids]
            batch = task.prepare_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
            with parallel.activation_rules(mesh, task.rules):
                out = score(restored.params, restored.extra["vlm"], restored.extra.get("latent", {}),
                            parallel.shard_batch(batch, mesh))
            bpd, target, nll, tokens = jax.device_get(out)
            real = np.arange(start, start + batch_size) < count  # the global rows; the last batch is padded
            for row in np.flatnonzero(real):
                doc = start + int(row)
                for k in np.flatnonzero(target[row]):
                    key = doc * spec.max_images + int(k)
                    sums[key] = sums.get(key, 0.0) + float(bpd[row, k])
            nll_total += float(np.sum(np.where(real, nll, 0.0)))
            tokens_total += int(np.sum(np.where(real, tokens, 0)))
    if not sums:
        raise ValueError(f"--split {split!r}: none of its {count} documents holds a target image")
    indices = np.asarray(sorted(sums), np.int64)
    values = np.asarray([sums[i] / num_samples for i in indices.tolist()], np.float64)
    extra = dict(num_documents=count, text_tokens=tokens_total // int(num_samples),
                 text_nll_per_token=nll_total / tokens_total if tokens_total else None, latent="patches")
    return Scores(indices=indices, values=values, extra=extra)


BPD = Scorer(check=check_bpd, score=score_bpd)
