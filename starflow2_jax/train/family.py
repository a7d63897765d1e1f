"""What a model family is: the one object the trainer, restore, ``starflow2 sample`` / ``eval`` and the
benches ask about a ``model.family`` (see ``train.families`` for the registry).

A family module (``train.tasks.flow``, ``train.tasks.fae``, …) defines ``FAMILY = Family(...)``:

- its config section: ``add_defaults(config)`` adds its fields with their defaults to the base config
  (in place), ``validate(config)`` checks them (ValueError naming the field);
- ``resolve(config)``: fills the data-dependent fields of a validated config in place (latent views,
  sizes read from checkpoints), so that the stored config alone determines the model;
- ``make_task(config)``: its ``Task`` (see ``train.task``) for a resolved config;
- ``frozen_parts(config)``: its pretrained frozen parts (``train.frozen.FrozenPart``), loaded at every
  start and never written into step checkpoints;
- what the commands offer for it: ``samples`` (``starflow2 sample`` works on its runs) and
  ``evaluations`` (the ``starflow2 eval`` kinds that accept its runs, e.g. ``('bpd',)``);
- ``next_steps(config, workdir)``: the hint ``starflow2 train`` prints after a run (optional);
- ``train_data(config, workdir)``: its stream of training batches (a grain ``IterDataset``), for a
  family whose batches are not ``train.inputs.make_train_data``'s images (optional; starflow2: packed
  rows);
- ``draw_samples(restored, *, label, prompt, guidance, jacobi, num, seed, batch_size)``: how
  ``starflow2 sample`` draws a grid from a restored run (a ``Drawn``); None: the image flows' sampler
  (``train.generate.generate``);
- ``bpd_scorer``: how ``starflow2 eval bpd`` scores a split (a ``Scorer``); None: the image flows'
  (``eval.bpd.bpd_per_image``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import ml_collections


def _nothing(config) -> None:
    del config


def _no_parts(config) -> tuple:
    del config
    return ()


def _no_hint(config, workdir: str) -> str:
    del config, workdir
    return ""


class Drawn(NamedTuple):
    """A sample grid a family drew: images float32 (rows, cols, H, W, C) in [−1, 1]; per row its name,
    prompt ('' : none) and guidance weight; summary: further JSON fields for the sample summary."""

    images: Any
    row_names: list
    row_prompts: list
    row_guidance: list
    summary: dict


class Scores(NamedTuple):
    """A split scored per image: indices (n,) int64 (one per image, unique), values (n,) float64 (each
    image's mean over the passes); extra: further JSON fields of the result (e.g. a text NLL)."""

    indices: Any
    values: Any
    extra: dict


@dataclasses.dataclass(frozen=True)
class Scorer:
    """An evaluation of a family's runs: ``check(config, workdir)`` raises ValueError when it does not
    apply to the run (called before any weights load); ``score(restored, workdir, *, split,
    num_samples, seed, batch_size)`` returns ``Scores`` (ValueError naming ``--split`` /
    ``--batch-size`` for bad ones)."""

    check: Callable[[ml_collections.ConfigDict, Any], None]
    score: Callable[..., Scores]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family; see the module docstring for each field."""

    name: str
    add_defaults: Callable[[ml_collections.ConfigDict], None]
    validate: Callable[[ml_collections.ConfigDict], None]
    make_task: Callable[[ml_collections.ConfigDict], Any]
    resolve: Callable[[ml_collections.ConfigDict], None] = _nothing
    frozen_parts: Callable[[ml_collections.ConfigDict], tuple] = _no_parts
    samples: bool = False
    evaluations: tuple[str, ...] = ()
    next_steps: Callable[[ml_collections.ConfigDict, str], str] = _no_hint
    train_data: Callable[[ml_collections.ConfigDict, str], Any] | None = None
    draw_samples: Callable[..., Drawn] | None = None
    bpd_scorer: Scorer | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Family.name={self.name!r}: expected an identifier such as 'flow'")
