"""The latent space a flow training config selects (``model.latent``), and the FAE's trained variables.

``resolve_latent(config)`` rewrites a config in place so the stored config says exactly what the flow
sees: the pixel view moves to ``model.latent.{image_size, channels, patch}`` and the flow's kwargs
become the latent grid (``img_size`` = grid, ``in_channels`` = D, ``patch_size`` = 1). For 'fae' it
also sets ``data.image_size`` / ``data.channels`` to what the FAE takes (3-channel, its image size)
and copies the FAE's config into ``model.latent.fae``, so the latent space is known from the config
alone (the FAE workdir is read again only to load its weights at a run's first start).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from starflow2_jax.fae.config import FAEConfig, fae_config_from_dict, fae_config_to_dict
from starflow2_jax.fae.latent_space import FAESpace, PatchesSpace, check_latent_stats


def _side(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"model.flow.kwargs.img_size={value!r}: latent spaces take square images")
        value = value[0]
    return int(value)


def fae_config_of_workdir(workdir: str) -> FAEConfig:
    """The ``FAEConfig`` stored with the latest checkpoint of an FAE training workdir."""
    from starflow2_jax.train.restore import latest_step_dir, read_step_config
    from starflow2_jax.train.tasks.fae import fae_config_from

    _, step_dir = latest_step_dir(workdir)
    config = read_step_config(step_dir)
    if config.model.family != "fae":
        raise ValueError(f"model.latent.fae_workdir={workdir!r} holds a model.family={config.model.family!r} run, "
                         f"not an FAE")
    return fae_config_from(config)


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


def load_fae_variables(workdir: str, shardings=None) -> dict:
    """``{'dinov2', 'fae', 'latent_stats'}`` of the FAE trained in ``workdir`` (latest checkpoint, raw
    params), placed as ``shardings`` (a matching tree of shardings) when given. Raises ValueError when
    its latent statistics were never computed."""
    from starflow2_jax.train.restore import restore_workdir

    restored = restore_workdir(os.fspath(workdir), ema=False)
    variables = {"dinov2": restored.extra["dinov2"],
                 "fae": {k: restored.params[k] for k in ("encoder", "feature_decoder", "pixel_decoder")},
                 "latent_stats": restored.extra["latent_stats"]}
    check_latent_stats(variables, where=f"the FAE in {os.fspath(workdir)!r} (step {restored.step})")
    if shardings is not None:
        variables = jax.tree.map(jax.device_put, variables, shardings)
    return variables
