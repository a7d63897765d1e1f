"""``Starflow2Task``: STARFlow2 / Pretzel's three training stages through the shared loop (SPEC §5.1).

Stages (``model.starflow2.stage``), run in this order, each starting from the previous one's checkpoint
(``train.init_from``) with the parts new in it declared (``train.init_new``)::

    stage1  text → image   trains shallow_*, deep (P_txt, P_in, heads)  L_NF            adapter, bridges off
    stage2  image → text   trains adapter                               L_NTP           new: adapter/*
    stage3  interleaved    trains adapter, shallow_*, deep, bridges     L_NF + λ·L_NTP  new: vlm_to_flow/*,
                                                                                        flow_to_lm/*

Parameters are the switched-on parts of ``pretzel.init`` (``shallow_{k}``, ``deep``, ``adapter``,
``vlm_to_flow``, ``flow_to_lm``); ``trainable`` labels the ones a stage does not train False (no
optimiser state, no update, no EMA). The frozen parts (``train.frozen``), loaded from their sources at
every start and never written into step checkpoints, are ``extra_vars`` entries:

    vlm         the Qwen2.5-VL text decoder (source ``model.starflow2.vlm_checkpoint``: a Hugging Face
                Qwen2.5-VL directory, an Orbax checkpoint, an earlier run, or '' = random from the seed)
    vlm_vision  its vision tower, only with ``model.starflow2.vision_tower=True`` (baselines)
    latent      the trained FAE (``model.starflow2.latent.kind='fae'``, source ``latent.fae_workdir``)

Batches are packed rows (``data.packing``) of the Pretzel layout (``pretzel.layout_document``) made by
``train.tasks.starflow2_data``; the loss is ``pretzel.loss`` with the stage's weights (caption dropout
and latent noise from the config); eval gives per-row image NLL (bits/dim for patch latents, nats/dim
for an FAE's) and NTP loss; ``sample_grid`` draws text → image for the grid prompts (at
``sample.image_temperature``). ``starflow2 sample`` and ``starflow2 eval bpd`` reach these runs through
the family's hooks (``train.tasks.starflow2_eval``).

This module also defines the 'starflow2' family (``FAMILY``): the ``model.starflow2`` config section,
its checks, resolution (a VLM checkpoint's config, an FAE workdir's config) and frozen parts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import pretzel
from starflow2_jax.fae.config import fae_config_from_dict, fae_config_to_dict
from starflow2_jax.fae.latent_space import FAESpace, PatchesSpace
from starflow2_jax.parallel import FAE_RULES, PRETZEL_RULES
from starflow2_jax.pretzel import model as pmodel
from starflow2_jax.train import config_fields as fields
from starflow2_jax.train.family import Family
from starflow2_jax.train.frozen import FrozenPart
from starflow2_jax.train.task import SampleGrid, TaskBase
from starflow2_jax.train.tasks import starflow2_eval
from starflow2_jax.vlm.config import QwenTextConfig

STAGES = ("stage1", "stage2", "stage3")
TRAINS = {"stage1": ("shallow_*", "deep"), "stage2": ("adapter",),
          "stage3": ("shallow_*", "deep", "adapter", "vlm_to_flow", "flow_to_lm")}
NEW_PARTS = {"stage1": (), "stage2": ("adapter/*",), "stage3": ("vlm_to_flow/*", "flow_to_lm/*")}
LATENT_KINDS = ("patches", "fae")
PAIRS = ("t2i", "i2t", "mixed")  # an image–text pair as caption → image, image → caption, or either at random
FLOW_FIELDS = ("flow_width", "flow_head_dim", "flow_mlp_ratio", "shallow_blocks", "shallow_layers", "deep_layers",
               "soft_clip", "flow_rope_theta", "adapter", "adapter_hidden", "vlm_to_flow", "flow_to_lm", "ntp_weight",
               "caption_dropout", "latent_noise", "seq_len", "max_images", "dtype", "remat", "lm_chunk")
BATCH_KEYS = pmodel.BATCH_FIELDS + pmodel.LOSS_FIELDS + ("images",)


# ---- config → PretzelConfig --------------------------------------------------------------------
def vlm_config_from(section) -> QwenTextConfig:
    """The ``QwenTextConfig`` of ``model.starflow2.vlm`` (a dict of its fields; unset ones take the
    Qwen2.5-VL-7B defaults) computing in ``model.starflow2.vlm_dtype`` ('' → the flows' dtype)."""
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section.vlm).items()}
    values.setdefault("dtype", section.vlm_dtype or section.dtype)
    values.setdefault("remat", section.remat)
    try:
        return QwenTextConfig(**values).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.starflow2.vlm={dict(section.vlm)}: {error}") from error


def latent_space_of(section):
    """The ``PatchesSpace`` / ``FAESpace`` of a resolved ``model.starflow2.latent``."""
    lat = section.latent
    if lat.kind == "patches":
        return PatchesSpace(int(lat.image_size), int(lat.image_size), int(lat.channels), int(lat.patch))
    if not lat.fae:
        raise ValueError("model.starflow2.latent.fae is empty: the config is not resolved (the trainer fills it "
                         "from model.starflow2.latent.fae_workdir)")
    return FAESpace(fae_config_from_dict(lat.fae.to_dict()))


def pretzel_config_from(config) -> pretzel.PretzelConfig:
    """The ``PretzelConfig`` of a resolved training config (ValueError naming ``model.starflow2``)."""
    s = config.model.starflow2
    values = {k: s[k] for k in FLOW_FIELDS}
    values["deep_mrope_section"] = tuple(s.deep_mrope_section)
    try:
        return pretzel.PretzelConfig(vlm=vlm_config_from(s), latent=latent_space_of(s), **values).validate()
    except ValueError as error:
        raise ValueError(f"model.starflow2: {error}") from error


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Starflow2Task(TaskBase):
    """A ``Task`` (see ``train.task``) for one STARFlow2 stage; see the module docstring."""

    jittable_sample_grid = False  # text → image switches to the host between segments (``starflow2 aot``)

    def __init__(self, config: pretzel.PretzelConfig, stage: str, *, prompts=(), per_prompt: int = 4, jacobi=None,
                 vision_tower: bool = False, levels: int = 255, encode=None, image_temperature: float = 1.0):
        if stage not in STAGES:
            raise ValueError(f"model.starflow2.stage={stage!r}: expected one of {STAGES}")
        self.config = config.validate()
        self.stage = stage
        self.prompts = list(prompts)
        self.per_prompt = int(per_prompt)
        self.jacobi = jacobi
        try:
            self.image_temperature = pretzel.check_image_temperature(image_temperature)
        except ValueError as error:
            raise ValueError(f"sample.{error}") from None
        self.vision_tower = bool(vision_tower)
        self.levels = int(levels)
        self.encode = encode
        self.latent_space = config.latent
        self.rules = PRETZEL_RULES + tuple(r for r in FAE_RULES if r[0] not in dict(PRETZEL_RULES))
        if stage == "stage2" and not config.adapter:
            raise ValueError("model.starflow2.adapter=False: stage2 trains the adapter (switch it on)")
        trained = [n for n in self.part_names() if _matches(n, TRAINS[stage])]
        if not trained:
            raise ValueError(f"model.starflow2.stage={stage!r}: none of its parts {TRAINS[stage]} is switched on")

    @classmethod
    def from_config(cls, config) -> "Starflow2Task":
        from starflow2_jax.train.tasks import starflow2_data

        s = config.model.starflow2
        jac = config.sample.jacobi
        jacobi = (dict(block_size=int(jac.block_size), threshold=float(jac.threshold), max_iters=int(jac.max_iters))
                  if jac.block_size > 0 else None)
        return cls(pretzel_config_from(config), s.stage, prompts=tuple(config.sample.prompts),
                   per_prompt=int(config.sample.per_class), jacobi=jacobi, vision_tower=bool(s.vision_tower),
                   levels=int(config.data.levels), encode=starflow2_data.make_tokenizer(config).encode,
                   image_temperature=float(config.sample.image_temperature))

    # ---- parts ------------------------------------------------------------------------------
    def part_names(self) -> list[str]:
        c = self.config
        names = [f"shallow_{k}" for k in range(c.shallow_blocks)] + ["deep"]
        return names + [n for n in ("adapter", "vlm_to_flow", "flow_to_lm") if getattr(c, n)]

    @property
    def nf_weight(self) -> float:
        return 0.0 if self.stage == "stage2" else 1.0

    @property
    def ntp_weight(self) -> float:
        return 0.0 if self.stage == "stage1" else float(self.config.ntp_weight)

    # ---- Task protocol ----------------------------------------------------------------------
    def init(self, rng):
        k_model, k_vlm = jax.random.split(rng)
        params = pretzel.init_boxed(self.config, k_model)
        # the frozen parts' shapes and logical names (loaded by train.frozen, never initialised here)
        extra = {"vlm": _vlm_boxed(self.config.vlm, k_vlm)}
        if self.vision_tower:
            extra["vlm_vision"] = _vision_boxed(self.config.vlm, k_vlm)
        latent = self.config.latent.init_variables(jax.random.fold_in(rng, 7))
        if latent:  # 'patches' has none
            extra["latent"] = latent
        return params, extra

    def trainable(self, params):
        """False for the parts this stage does not train, else the one update group 'pretzel'."""
        parts = TRAINS[self.stage]
        return {name: jax.tree.map(lambda _, n=name: "pretzel" if _matches(n, parts) else False, sub)
                for name, sub in params.items()}

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing} (fields: {sorted(batch)}); expected packed Pretzel rows "
                             f"(train.tasks.starflow2_data)")
        out = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
        pretzel.check_batch(self.config, out, loss=True)
        return out

    def _latent_vars(self, extra):
        return extra.get("latent", {})

    def loss(self, params, extra, batch, rng):
        return pretzel.loss(self.config, params, extra["vlm"], batch, latent_vars=self._latent_vars(extra), rng=rng,
                            nf_weight=self.nf_weight, ntp_weight=self.ntp_weight, train=True)

    def eval_step(self, params, extra, batch, rng):
        """Per row: the image NLL per dimension of its target images ('bits_per_dim' for patch latents
        of ``data.levels``-level pixels, 'nll_per_dim' in nats for an FAE's latents) and 'ntp_loss'
        (mean −log p of its trained tokens); NaN where a row has none."""
        del rng
        terms = pretzel.per_example(self.config, params, extra["vlm"], batch, latent_vars=self._latent_vars(extra),
                                    ntp_weight=float(self.config.ntp_weight) if self.config.ntp_weight else 1.0)
        images = jnp.sum(terms["nf_mask"], axis=1)
        nll = jnp.sum(terms["nf"], axis=1) / images + 0.5 * math.log(2 * math.pi)
        tokens = jnp.sum(terms["ntp_mask"], axis=1)
        out = {"ntp_loss": jnp.sum(terms["ntp"], axis=1) / tokens}
        if self.config.latent.kind == "patches":  # bins of width 2 / levels on [-1, 1]
            out["bits_per_dim"] = (nll + math.log(self.levels / 2.0)) / math.log(2.0)
        else:
            out["nll_per_dim"] = nll
        return out

    def grid_rows(self) -> list[str]:
        return list(self.prompts) or [""]

    def sample_grid(self, params, extra, rng, *, guidance: float, prompts=None, per_prompt: int | None = None,
                    jacobi="config", image_temperature: float | None = None) -> SampleGrid:
        """Text → image: ``per_prompt`` (default ``sample.per_class``) images per prompt (default the grid
        prompts ``sample.prompts``; none: the empty prompt, drawn unguided), clipped to [−1, 1]. Prompt
        i draws with ``fold_in(rng, i)``; jacobi 'config': ``sample.jacobi``; image_temperature None:
        ``sample.image_temperature`` (the noise of every image step is T·ε)."""
        prompts = self.grid_rows() if prompts is None else list(prompts)
        per_prompt = self.per_prompt if per_prompt is None else int(per_prompt)
        jacobi = self.jacobi if isinstance(jacobi, str) and jacobi == "config" else jacobi
        temperature = self.image_temperature if image_temperature is None else image_temperature
        rows = []
        for i, prompt in enumerate(prompts):
            doc = pretzel.layout_document(self.config, [prompt] if prompt else [], encode=self.encode) if prompt \
                else _empty_document(self.config)
            out = pretzel.text_to_image(self.config, params, extra["vlm"], self._latent_vars(extra), doc,
                                        rng=jax.random.fold_in(rng, i), num_samples=per_prompt,
                                        guidance=float(guidance) if prompt else 0.0, jacobi=jacobi,
                                        image_temperature=temperature)
            rows.append(jnp.clip(out["images"], -1.0, 1.0))
        return SampleGrid(jnp.stack(rows), prompts)

    def example_batch(self, batch_size: int) -> dict:
        """A zero packed batch of ``batch_size`` rows in the data pipeline's format (for ``starflow2 aot``)."""
        c = self.config
        length, m = c.seq_len, max(c.max_images, 1)
        return dict(tokens=np.zeros((batch_size, length), np.int32),
                    positions=np.zeros((batch_size, length, 3), np.int32),
                    slot=np.zeros((batch_size, length), bool), image_index=np.full((batch_size, length), -1, np.int32),
                    segment_ids=np.ones((batch_size, length), np.int32), text_loss=np.ones((batch_size, length), bool),
                    images=np.zeros((batch_size, m) + tuple(c.latent.image_shape), np.float32),
                    image_target=np.ones((batch_size, m), bool), image_valid=np.ones((batch_size, m), bool),
                    image_segment_ids=np.ones((batch_size, m), np.int32))


def _empty_document(config: pretzel.PretzelConfig) -> dict:
    d = pretzel.layout_document(config, [[0]])
    return {k: v[:0] for k, v in d.items()}


def _vlm_boxed(vlm_config: QwenTextConfig, rng):
    from starflow2_jax.vlm.model import text_init_boxed

    return text_init_boxed(vlm_config, rng)["params"]


def _vision_boxed(vlm_config: QwenTextConfig, rng):
    from starflow2_jax.vlm.config import QwenVisionConfig
    from starflow2_jax.vlm.vision import init_vision_boxed

    return init_vision_boxed(QwenVisionConfig(), rng)["params"]


# ---- the 'starflow2' family ---------------------------------------------------------------------
def add_defaults(config: ml_collections.ConfigDict) -> None:
    """The ``model.starflow2`` section with its defaults (``pretzel.tiny``'s sizes, random VLM)."""
    tiny = pretzel.tiny()
    vlm = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tiny.vlm).items()
           if k not in ("dtype", "remat")}
    config.model.starflow2 = ml_collections.ConfigDict(dict(
        stage="stage1", vlm=ml_collections.ConfigDict(vlm), vlm_checkpoint="", vlm_dtype="", vision_tower=False,
        tokenizer="bytes",
        latent=ml_collections.ConfigDict(dict(kind="patches", image_size=8, channels=1, patch=4, fae_workdir="",
                                              fae_dtype="", fae=ml_collections.ConfigDict())),
        flow_width=tiny.flow_width, flow_head_dim=tiny.flow_head_dim, flow_mlp_ratio=tiny.flow_mlp_ratio,
        shallow_blocks=tiny.shallow_blocks, shallow_layers=tiny.shallow_layers, deep_layers=tiny.deep_layers,
        soft_clip=tiny.soft_clip, flow_rope_theta=tiny.flow_rope_theta, deep_mrope_section=[],
        adapter=False, adapter_hidden=0, vlm_to_flow=False, flow_to_lm=False, ntp_weight=1.0,
        caption_dropout=0.1, latent_noise=0.0, seq_len=tiny.seq_len, max_images=tiny.max_images,
        dtype="float32", remat="none", lm_chunk=tiny.lm_chunk, packing_bins=16, overflow="error", pairs="t2i"))


def validate(config) -> None:
    """Checks ``model.starflow2`` (and the data builders it reads); ValueError naming the field."""
    p = "model.starflow2"
    fields.choice(config, f"{p}.stage", STAGES)
    fields.dict_field(config, f"{p}.vlm", "a dict of vlm.QwenTextConfig fields")
    fields.string_field(config, f"{p}.vlm_checkpoint", "a path string ('' for a random VLM)")
    if fields.string_field(config, f"{p}.vlm_dtype", "'' or a dtype") != "":
        fields.choice(config, f"{p}.vlm_dtype", fields.DTYPES)
    fields.string_field(config, f"{p}.tokenizer", "'bytes' or a Hugging Face tokenizer directory")
    kind = fields.choice(config, f"{p}.latent.kind", LATENT_KINDS)
    if kind == "patches":
        for field in ("image_size", "channels", "patch"):
            fields.int_field(config, f"{p}.latent.{field}", 1)
    elif not fields.string_field(config, f"{p}.latent.fae_workdir", "an FAE workdir") and \
            not config.model.starflow2.latent.fae:
        raise ValueError(f"{p}.latent.fae_workdir is empty: latent.kind='fae' reads a trained FAE's workdir (or, "
                         f"for shapes only, a random FAE of the config in {p}.latent.fae)")
    for field in ("flow_width", "flow_head_dim", "shallow_blocks", "shallow_layers", "deep_layers", "seq_len",
                  "packing_bins", "lm_chunk"):
        fields.int_field(config, f"{p}.{field}", 1)
    fields.int_field(config, f"{p}.max_images", 0)
    fields.int_field(config, f"{p}.adapter_hidden", 0)
    for field in ("flow_mlp_ratio", "soft_clip", "flow_rope_theta", "ntp_weight", "latent_noise"):
        fields.float_field(config, f"{p}.{field}", 0.0)
    fields.float_field(config, f"{p}.caption_dropout", 0.0, 1.0)
    for field in ("adapter", "vlm_to_flow", "flow_to_lm", "vision_tower"):
        if not isinstance(fields.get(config, f"{p}.{field}"), bool):
            raise ValueError(f"{p}.{field}={config.model.starflow2[field]!r}: expected a bool")
    fields.choice(config, f"{p}.dtype", fields.DTYPES)
    fields.choice(config, f"{p}.remat", fields.REMAT)
    fields.choice(config, f"{p}.overflow", ("error", "drop"))
    fields.choice(config, f"{p}.pairs", PAIRS)
    stage = config.model.starflow2.stage
    if stage == "stage1" and (config.model.starflow2.adapter or config.model.starflow2.vlm_to_flow or
                              config.model.starflow2.flow_to_lm):
        raise ValueError(f"{p}.stage='stage1': the adapter and the bridges are off in stage 1 (SPEC §5.1); set "
                         f"{p}.adapter, vlm_to_flow and flow_to_lm to False")
    if stage == "stage2" and not config.model.starflow2.adapter:
        raise ValueError(f"{p}.adapter=False: stage2 trains the adapter")
    if kind == "fae" and config.model.starflow2.latent.fae:
        fae_config_from_dict(config.model.starflow2.latent.fae.to_dict())
    if config.model.starflow2.latent.kind == "patches" and not config.model.starflow2.latent.fae_workdir == "":
        raise ValueError(f"{p}.latent.fae_workdir is set but latent.kind='patches'")
    size = fields.int_field(config, "data.image_size", 0)
    if kind == "patches" and size not in (0, config.model.starflow2.latent.image_size):
        raise ValueError(f"data.image_size={size}: the images are laid out at {p}.latent.image_size="
                         f"{config.model.starflow2.latent.image_size}; expected 0 (resized after the noise) or that size")
    if fields.get(config, "data.builder") == "digits_documents":
        _validate_digits_documents(config)


def _validate_digits_documents(config) -> None:
    """data.builder='digits_documents': the kinds fit ``pairs``; documents come from the train split only."""
    from starflow2_jax.data.digits_documents import stage_kinds

    stage_kinds(config.model.starflow2.pairs, fields.get(config, "data.kinds"))
    split = fields.get(config, "data.split")
    if split != "train":
        raise ValueError(f"data.split={split!r}: data.builder='digits_documents' draws its documents from the digits' "
                         f"'train' split only (the 297 held-out 'test' digits are the demo's scoring set); expected "
                         f"'train'")


def resolve(config) -> None:
    """Fills ``model.starflow2.vlm`` from a Hugging Face ``vlm_checkpoint``'s config.json (after checking
    it is a Qwen2.5-VL whose text decoder has every field the section sets) and ``latent.fae`` from the
    FAE workdir, so the stored config alone determines the model. Idempotent."""
    s = config.model.starflow2
    path = s.vlm_checkpoint
    if path:
        if "://" not in path and not os.path.isdir(path):
            raise FileNotFoundError(f"model.starflow2.vlm_checkpoint={path!r}: no such directory (expected a "
                                    f"Hugging Face Qwen2.5-VL directory, an Orbax checkpoint or an earlier run)")
        if os.path.isfile(os.path.join(path, "config.json")):
            _resolve_hf_vlm(config, path)
    if s.latent.kind == "fae" and s.latent.fae_workdir:
        from starflow2_jax.train.tasks import latents as latents_lib

        fae = latents_lib.fae_config_of_workdir(s.latent.fae_workdir)
        s.latent.fae = ml_collections.ConfigDict(fae_config_to_dict(fae))
        s.latent.image_size, s.latent.channels, s.latent.patch = fae.image_size, 3, 0
    pretzel_config_from(config)  # every field checked together (e.g. max_images × slots ≤ seq_len)


def _resolve_hf_vlm(config, path: str) -> None:
    from starflow2_jax.convert.hf_qwen import read_config

    s = config.model.starflow2
    try:
        found = read_config(path).text
    except (ValueError, NotImplementedError) as error:
        raise ValueError(f"model.starflow2.vlm_checkpoint={path!r}: {error}") from error
    given = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(s.vlm).items()}
    stored = dataclasses.asdict(found)
    differ = {k: (v, stored[k]) for k, v in given.items() if k in stored and stored[k] != v}
    if differ:
        raise ValueError(f"model.starflow2.vlm_checkpoint={path!r} is not the VLM model.starflow2.vlm describes: "
                         + ", ".join(f"{k}={want!r} there {have!r}" for k, (want, have) in differ.items()))
    s.vlm = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in stored.items()
                                       if k not in ("dtype", "remat")})


def random_vlm(vlm_config: QwenTextConfig, seed: int):
    """The random VLM text decoder of a run with ``seed`` (a '' source: tests, tiny runs)."""
    from starflow2_jax.vlm.model import init_text

    return init_text(vlm_config, jax.random.fold_in(jax.random.key(seed), 17))


def random_vision(seed: int):
    return nn.meta.unbox(_vision_boxed(None, jax.random.fold_in(jax.random.key(seed), 18)))


def frozen_parts(config) -> tuple:
    """The VLM text decoder ('vlm'), its vision tower when asked for ('vlm_vision') and the FAE
    ('latent', latent.kind='fae')."""
    from starflow2_jax.train.tasks import latents as latents_lib

    s = config.model.starflow2
    vlm_config = vlm_config_from(s)
    dtype = str(s.vlm_dtype or s.dtype)

    def from_hf(which: str):
        def load(directory: str, target):
            from starflow2_jax.convert.hf_qwen import load_hf_qwen2_5_vl

            leaf = jax.tree.leaves(target)[0]
            mesh = getattr(leaf.sharding, "mesh", None)
            _, params = load_hf_qwen2_5_vl(directory, dtype="bfloat16" if leaf.dtype == jnp.bfloat16 else "float32",
                                           mesh=mesh, rules=PRETZEL_RULES)
            return params[which]
        return load

    parts = [FrozenPart(name="vlm", field="model.starflow2.vlm_checkpoint", source=str(s.vlm_checkpoint), dtype=dtype,
                        init=functools.partial(random_vlm, vlm_config), from_hf=from_hf("text"))]
    if s.vision_tower:
        parts.append(FrozenPart(name="vlm_vision", field="model.starflow2.vlm_checkpoint", source=str(s.vlm_checkpoint),
                                dtype=dtype, init=random_vision, from_hf=from_hf("vision")))
    if s.latent.kind == "fae":
        fae_dtype = str(s.latent.fae_dtype or (s.latent.fae.get("dtype") if s.latent.fae else "") or "float32")
        space = latent_space_of(s)
        parts.append(FrozenPart(name="latent", field="model.starflow2.latent.fae_workdir",
                                source=str(s.latent.fae_workdir), dtype=fae_dtype, from_run=latents_lib.load_fae_run,
                                init=lambda seed: nn.meta.unbox(space.init_variables(jax.random.key(seed)))))
    return tuple(parts)


def _train_data(config, workdir: str):
    """The packed rows, after reading one batch: a document that does not fit the model (an image where
    the config holds none, more images than a row holds, a prompt over the row length) is an error
    before the trainer writes anything."""
    from starflow2_jax.train.tasks import starflow2_data

    data = starflow2_data.make_train_data(config, workdir, pretzel_config_from(config))
    next(iter(data))
    return data


def _next_steps(config, workdir: str) -> str:
    stage = config.model.starflow2.stage
    following = {"stage1": "stage2", "stage2": "stage3"}.get(stage)
    if following:
        return (f"  the next stage: --config configs/starflow2.py:...,{following} "
                f"--config.train.init_from={workdir}")
    return (f"  generate: starflow2 generate --workdir {workdir} --mode t2i --prompt '...' --out DIR\n"
            f"  starflow2 sample --workdir {workdir} --out {os.path.join(workdir, 'grid.png')}\n"
            f"  starflow2 eval bpd --workdir {workdir}")


FAMILY = Family(name="starflow2", add_defaults=add_defaults, validate=validate, make_task=Starflow2Task.from_config,
                resolve=resolve, frozen_parts=frozen_parts, samples=True, evaluations=("bpd",),
                next_steps=_next_steps, train_data=_train_data, draw_samples=starflow2_eval.draw_samples,
                bpd_scorer=starflow2_eval.BPD)
