"""The latent-space interface flows (and Pretzel) generate in: images ↔ latents (B, N, D).

Two implementations with one shape contract — ``encode(variables, images (B, H, W, C)) -> (B, N, D)``
and ``decode(variables, latents) -> images``, N = grid[0]·grid[1] tokens in raster order:

- ``PatchesSpace``: pixels cut into p×p patches (features ordered (i, j, c)); no parameters, an exact
  round trip. A flow with patch size 1 on this grid equals a flow with patch size p on the pixels.
- ``FAESpace``: the FAE (frozen DINOv2 → encoder posterior mean), normalised per channel with the
  latent statistics stored in its checkpoint (``(mean − μ) / σ``); decode inverts the normalisation
  and runs the feature decoder and pixel decoder.

Both are static descriptions (hashable, safe as ``jit`` static arguments); their variables are passed
explicitly, so they can live in a train state's ``extra_vars`` and be sharded like any pytree.
``Bound(space, variables)`` gives the one-argument ``encode(images)`` / ``decode(latents)``, jitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from starflow2_jax.fae import api
from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.fae.model import patchify, unpatchify

KINDS = ("patches", "fae")


class LatentSpace(Protocol):
    """kind: 'patches' | 'fae'; image_shape (H, W, C); grid (gh, gw); latent_dim D."""

    kind: str

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def grid(self) -> tuple[int, int]: ...

    @property
    def latent_dim(self) -> int: ...

    def encode(self, variables, images: jax.Array) -> jax.Array:
        """(B, H, W, C) images in [−1, 1] → (B, N, D) latents."""

    def decode(self, variables, latents: jax.Array) -> jax.Array:
        """(B, N, D) latents → (B, H, W, C) images."""

    def init_variables(self, rng) -> dict:
        """Variables of the right structure (boxed, random) for sharding and placeholders."""


@dataclasses.dataclass(frozen=True)
class PatchesSpace:
    """p×p pixel patches of (height, width, channels) images; variables: ``{}``."""

    height: int
    width: int
    channels: int
    patch: int
    kind: str = dataclasses.field(default="patches", init=False)

    def __post_init__(self):
        for name in ("height", "width", "channels", "patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchesSpace.{name}={value!r}: expected a positive int")
        if self.height % self.patch or self.width % self.patch:
            raise ValueError(f"PatchesSpace: image size {self.height}x{self.width} is not divisible by the "
                             f"patch size {self.patch}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.height // self.patch, self.width // self.patch)

    @property
    def latent_dim(self) -> int:
        return self.patch * self.patch * self.channels

    def init_variables(self, rng=None) -> dict:
        """No parameters: ``{}``."""
        del rng
        return {}

    def encode(self, variables, images):
        del variables
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1:] != self.image_shape:
            raise ValueError(f"patches latent space: images have shape {shape}, expected (B, {self.height}, "
                             f"{self.width}, {self.channels}) (patch size {self.patch})")
        return patchify(images, self.patch)

    def decode(self, variables, latents):
        del variables
        n = self.grid[0] * self.grid[1]
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (n, self.latent_dim):
            raise ValueError(f"patches latent space: latents have shape {tuple(latents.shape)}, expected "
                             f"(B, {n}, {self.latent_dim})")
        b = latents.shape[0]
        p, (gh, gw) = self.patch, self.grid
        x = latents.reshape(b, gh, gw, p, p, self.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * p, gw * p, self.channels)


@dataclasses.dataclass(frozen=True)
class FAESpace:
    """The FAE latent space of ``config``; variables: ``{'dinov2', 'fae', 'latent_stats'}`` (see ``fae.api``)."""

    config: FAEConfig
    kind: str = dataclasses.field(default="fae", init=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.image_size, self.config.image_size, 3)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid, self.config.grid)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def init_variables(self, rng) -> dict:
        """Random boxed variables of the trained ones' structure (placeholders until loaded)."""
        return api.init_variables_boxed(self.config, rng)

    def encode(self, variables, images):
        feats = api.encoder_features(self.config, variables["dinov2"], images)
        mean, _ = api.encode_features(self.config, variables["fae"], feats)
        stats = variables["latent_stats"]
        return (mean - stats["mean"]) / stats["std"]

    def decode(self, variables, latents):
        n, d = self.config.num_tokens, self.config.latent_dim
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (n, d):
            raise ValueError(f"FAE latent space: latents have shape {tuple(latents.shape)}, expected (B, {n}, {d})")
        stats = variables["latent_stats"]
        raw = latents.astype(jnp.float32) * stats["std"] + stats["mean"]
        feats = api.decode_features(self.config, variables["fae"], raw)
        return api.decode_pixels(self.config, variables["fae"], feats)


def check_latent_stats(variables: Any, where: str = "the FAE variables") -> None:
    """Raises ValueError when the latent statistics were never computed (count 0)."""
    count = float(jax.device_get(variables["latent_stats"]["count"]))
    if count <= 0:
        raise ValueError(f"{where} have no latent statistics (count 0): they are computed at the end of FAE "
                         f"stage 'ib' (encoder + feature decoder); train that stage to its last step first")


class Bound:
    """A latent space with its variables: ``encode(images)`` / ``decode(latents)`` (jitted; the
    outputs follow the inputs' and variables' shardings)."""

    def __init__(self, space, variables):
        self.space = space
        self.variables = variables
        self._encode = jax.jit(space.encode)
        self._decode = jax.jit(space.decode)

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, N, D)."""
        return self._encode(self.variables, images)

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, N, D) → (B, H, W, C)."""
        return self._decode(self.variables, latents)
