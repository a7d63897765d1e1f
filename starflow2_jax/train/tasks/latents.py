"""The latent space a flow training config selects (``model.latent``), and the FAE's trained variables.

``resolve_latent(config)`` rewrites a config in place so the stored config says exactly what the flow
sees: the pixel view moves to ``model.latent.{image_size, channels, patch}`` and the flow's kwargs
become the latent grid (``img_size`` = grid, ``in_channels`` = D, ``patch_size`` = 1). For 'fae' it
also sets ``data.image_size`` / ``data.channels`` to what the FAE takes (3-channel, its image size)
and copies the FAE's config into ``model.latent.fae``, so the latent space is known from the config
alone. The FAE's weights are the flow family's frozen part 'latent' (``frozen_parts``): loaded from
the FAE workdir at every start (``load_fae_run``), never saved in the flow's step checkpoints.

The FAE workdir is read at the file level (its stored config JSON, its checkpoint items), not through
``train.restore``: this module sits below the config schema and the run-on-disk module.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections

from starflow2_jax.fae import api as fae_api
from starflow2_jax.fae.config import FAEConfig, fae_config_from_dict, fae_config_to_dict
from starflow2_jax.fae.latent_space import FAESpace, PatchesSpace, check_latent_stats
from starflow2_jax.train import checkpoint as ckpt_lib
from starflow2_jax.train import frozen
from starflow2_jax.train.tasks import fae as fae_family


def _side(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"model.flow.kwargs.img_size={value!r}: latent spaces take square images")
        value = value[0]
    return int(value)


def _fae_run(workdir: str) -> tuple:
    """``(latest complete step dir, stored config JSON)`` of an FAE training workdir; ValueError when
    it holds another family's run."""
    try:
        step_dir = ckpt_lib.resolve_step_dir(workdir)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.latent.fae_workdir={workdir!r}: no complete checkpoint there (train the "
                                f"FAE first: configs/fae.py)") from None
    stored = ckpt_lib.read_config_json(step_dir)
    family = stored.get("model", {}).get("family")
    if family != "fae":
        raise ValueError(f"model.latent.fae_workdir={workdir!r} holds a model.family={family!r} run, not an FAE")
    return step_dir, stored


def fae_config_of_workdir(workdir: str) -> FAEConfig:
    """The ``FAEConfig`` stored with the latest checkpoint of an FAE training workdir."""
    _, stored = _fae_run(workdir)
    return fae_family.fae_config_from(fae_family.section_config(stored))


def resolve_latent(config: ml_collections.ConfigDict) -> None:
    """See the module docstring; a no-op for ``model.latent.kind='pixels'``. Idempotent."""
    lat, kw = config.model.latent, config.model.flow.kwargs
    if lat.kind == "pixels":
        return
    if lat.kind == "patches":
        lat.patch = lat.patch or int(kw.get("patch_size", 1))
        lat.image_size = lat.image_size or _side(kw.img_size)
        lat.channels = lat.channels or int(kw.get("in_channels", 3))
        space = PatchesSpace(lat.image_size, lat.image_size, lat.channels, lat.patch)
    else:
        fae = fae_config_of_workdir(lat.fae_workdir)
        lat.image_size, lat.channels, lat.patch = fae.image_size, 3, 0
        for field, want in (("image_size", fae.image_size), ("channels", 3)):
            have = int(config.data[field])
            if have not in (0, want):
                raise ValueError(f"data.{field}={have}: the FAE in {lat.fae_workdir!r} takes {want} "
                                 f"(leave it 0 to have it set)")
            config.data[field] = want
        lat.fae = ml_collections.ConfigDict(fae_config_to_dict(fae))
        space = FAESpace(fae)
    kw.img_size = space.grid[0]
    kw.in_channels = space.latent_dim
    kw.patch_size = 1


def latent_space_from(config: ml_collections.ConfigDict):
    """The latent space of a *resolved* config (None for 'pixels')."""
    lat = config.model.latent
    if lat.kind == "pixels":
        return None
    if lat.kind == "patches":
        return PatchesSpace(int(lat.image_size), int(lat.image_size), int(lat.channels), int(lat.patch))
    if not lat.fae:
        raise ValueError("model.latent.fae is empty: the config is not resolved (train.loop.resolve_config fills "
                         "it from model.latent.fae_workdir)")
    return FAESpace(fae_config_from_dict(lat.fae.to_dict()))


def load_fae_run(workdir: str, target) -> dict:
    """``{'dinov2', 'fae', 'latent_stats'}`` of the FAE trained in ``workdir`` (latest complete step, raw
    params) laid out as ``target`` (abstract arrays with shardings): its parts and statistics from the
    step checkpoint, its DINOv2 from the source that run recorded (older runs: from the step). Raises
    ValueError when its latent statistics were never computed."""
    step_dir, stored = _fae_run(os.fspath(workdir))
    parts = {"fae": {k: target["fae"][k] for k in fae_api.PARTS}}
    params = ckpt_lib.restore_item(step_dir, "state", {"params": parts["fae"]})["params"]
    in_extra = {k.split("/")[0] for k in ckpt_lib.stored_shapes(step_dir / "extra")}
    wanted = {"latent_stats": target["latent_stats"]}
    if "dinov2" in in_extra:  # a run from before frozen parts kept DINOv2 in every step
        wanted["dinov2"] = target["dinov2"]
    extra = ckpt_lib.restore_item(step_dir, "extra", wanted)
    variables = {"fae": params, "latent_stats": extra["latent_stats"]}
    check_latent_stats(variables, where=f"the FAE in {os.fspath(workdir)!r} (step {step_dir.name})")
    if "dinov2" in extra:
        variables["dinov2"] = extra["dinov2"]
    else:
        part = fae_family.dinov2_part(fae_family.section_config(stored))
        records = dict(stored.get("frozen", {}))
        loaded, _ = frozen.load_parts([part], {"dinov2": target["dinov2"]}, seed=int(stored.get("seed", 0)),
                                      records=records if "dinov2" in records else None)
        variables["dinov2"] = loaded["dinov2"]
    return variables


def frozen_parts(config) -> tuple:
    """The flow family's frozen parts: the FAE under a flow on FAE latents ('latent'), else none."""
    lat = config.model.latent
    if lat.kind != "fae":
        return ()
    dtype = str(lat.fae_dtype or (lat.fae.get("dtype") if lat.fae else "") or "float32")
    return (frozen.FrozenPart(name="latent", field="model.latent.fae_workdir", source=str(lat.fae_workdir),
                              dtype=dtype, from_run=load_fae_run),)


def load_fae_variables(workdir: str, shardings=None) -> dict:
    """``{'dinov2', 'fae', 'latent_stats'}`` of the FAE trained in ``workdir`` (see ``load_fae_run``),
    placed as ``shardings`` (a matching tree of shardings) when given, else on the default device."""
    config = fae_config_of_workdir(os.fspath(workdir))
    abstract = nn.meta.unbox(jax.eval_shape(lambda: fae_api.init_variables_boxed(config, jax.random.key(0))))
    abstract["fae"] = {k: abstract["fae"][k] for k in fae_api.PARTS}
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return load_fae_run(os.fspath(workdir), target)
