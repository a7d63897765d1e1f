"""Logical-axis rules: one table per model family mapping logical axis names to mesh axes.

A table is a tuple of ``(logical_name, mesh_axes)`` pairs in Flax's format (``mesh_axes`` is a mesh
axis name, a tuple of them, or None = replicated); ``nn.logical_axis_rules`` and
``nn.logical_to_mesh_axes`` read it. Parameter names (``embed``, ``mlp``, …) decide how weights are
stored; ``act_*`` names decide the activation constraints inside the models.

Layout: FSDP shards the model width (``embed``) over ``fsdp``; tensor parallelism shards the wide
inner dimensions (``mlp``, ``heads``, ``kv_heads``, ``vocab``) over ``tensor``; batches (and the
batch dimension of activations) are split over ``('data', 'fsdp')``.

Divisibility fallback: a dimension whose size is not divisible by the product of the mesh axes its
rule names is replicated instead (``fit_spec``), so tiny models and odd head counts still shard
(whatever does divide). This happens silently; ``logical_shardings`` applies it per leaf.
"""

from __future__ import annotations

import math
from typing import Sequence

from jax.sharding import Mesh, PartitionSpec

BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("latent", None),
    ("classes", None),
    ("seq", None),
    ("text_embed", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

# TarFlow / STARFlow stacks (starflow2_jax.flow). Same layout as the default for now; kept separate
# so the flow family can diverge (e.g. sequence sharding of long latents) without touching others.
FLOW_RULES: Rules = DEFAULT_RULES


# Qwen2.5-VL (starflow2_jax.vlm): the default layout; the vision tower's patch embedding reads its
# input features under the name ``patch`` (C·tp·p·p = 1176 for Qwen), kept replicated.
VLM_RULES: Rules = DEFAULT_RULES + (("patch", None),)

# DINOv2 and the FAE (starflow2_jax.fae): the default layout; the DINOv2 patch embedding reads its
# flattened patches (patch·patch·C features) under the name ``patch`` (also the pixel decoder's
# output patches), kept replicated, as are the PatchGAN discriminator's small convolutions.
FAE_RULES: Rules = DEFAULT_RULES + (("patch", None), ("conv_in", None), ("conv_out", None))

# STARFlow2 / Pretzel (starflow2_jax.pretzel): the frozen VLM, the FAE and the flows together, so the
# union of their extra names. ``text_embed`` (the VLM width where a flow-side weight reads or writes
# it: P_txt, W_vlm, W_D, the adapter's output) stays replicated like the flows' text projection.
PRETZEL_RULES: Rules = DEFAULT_RULES + (("patch", None), ("conv_in", None), ("conv_out", None))


def axes_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of devices a spec entry (axis name, tuple of names, or None) splits a dimension into."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` with every entry whose mesh-axes size does not divide that dimension replaced by None.

    ``spec`` may be shorter than ``shape`` (trailing dimensions replicated). Returns a
    ``PartitionSpec`` of exactly ``len(shape)`` entries.
    """
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    if len(entries) != len(shape):
        raise ValueError(f"partition spec {spec} has {len(spec)} entries for a rank-{len(shape)} shape {tuple(shape)}")
    return PartitionSpec(*(axes if dim % axes_size(mesh, axes) == 0 else None
                           for axes, dim in zip(entries, shape)))
