"""The training data a config names, built with ``starflow2_jax.data`` (imported lazily).

``data.builder='digits'``: the embedded scikit-learn digits, ``'photos'``: scikit-image's photos cut
into RGB tiles plus the digits (TFDS files written on first use into ``data.data_dir``, default
``<workdir>/tfds``); ``'directory'``: any prepared TFDS dataset directory
(``tfds.builder_from_directory(data.data_dir)``). Either way a grain pipeline shards it by JAX
process, shuffles with ``seed``, preprocesses (scale, noise, label/caption dropout) and batches.
"""

from __future__ import annotations

import os
from typing import Sequence

import grain


def data_dir(config, workdir: os.PathLike | str) -> str:
    """Where the TFDS files of ``config.data`` live."""
    return config.data.data_dir or os.path.join(os.fspath(workdir), "tfds")


def make_source(config, split: str, workdir: os.PathLike | str, *, builder: str | None = None):
    """The random-access TFDS data source of ``split`` for ``builder`` (default ``config.data.builder``).

    The dataset's files are checked first (``data.check.check_dataset_dir``): a missing or damaged
    file is a ``DatasetError`` (a ValueError) naming it and ``data.data_dir``, also when a record
    turns out unreadable later (``NamedSource``).
    """
    from starflow2_jax.data.check import NamedSource, check_dataset_dir

    builder = builder or config.data.builder
    if builder in ("digits", "photos"):
        from starflow2_jax.data.digits import build_digits
        from starflow2_jax.data.photos import build_photos
        from starflow2_jax.parallel import process_0_first

        build = build_digits if builder == "digits" else build_photos  # process 0 writes the files, the rest wait
        prepared = process_0_first(lambda: build(data_dir(config, workdir)), f"starflow2_jax.inputs.build_{builder}")
        check_dataset_dir(prepared.data_dir, field="data.data_dir", splits=[split], value=data_dir(config, workdir))
        return NamedSource(prepared.as_data_source(split), prepared.data_dir, split, value=data_dir(config, workdir))
    if builder == "directory":
        import tensorflow_datasets as tfds
        check_dataset_dir(config.data.data_dir, field="data.data_dir", splits=[split])
        return NamedSource(tfds.builder_from_directory(config.data.data_dir).as_data_source(split),
                           config.data.data_dir, split)
    raise ValueError(f"data.builder={builder!r}: expected 'digits', 'photos' or 'directory'")


def make_train_data(config, workdir: os.PathLike | str) -> grain.IterDataset:
    """This process's endless, shuffled stream of training batches (per-process batch size)."""
    from starflow2_jax.data.pipeline import make_pipeline
    from starflow2_jax.data.preprocess import ImagePreprocess

    d = config.data
    preprocess = ImagePreprocess(levels=int(d.levels), noise=d.noise, noise_std=float(d.noise_std),
                                 label_dropout=float(d.label_drop), caption_dropout=float(d.caption_drop),
                                 image_size=int(d.image_size), channels=int(d.channels))
    return make_pipeline(make_source(config, d.split, workdir), batch_size=int(d.batch_size), seed=int(config.seed),
                         shuffle=True, preprocess=preprocess, num_epochs=None, drop_remainder=True,
                         worker_count=int(d.worker_count))


def default_captions(config) -> tuple[Sequence[str], Sequence[str]]:
    """``(vocabulary texts, grid prompts)`` for a config whose ``model.text.vocab`` /
    ``sample.prompts`` are empty: the digits' caption templates for every digit, and the first
    template per digit. Other builders have no defaults (``validate`` asks for the vocab)."""
    if config.data.builder != "digits":
        return tuple(config.model.text.vocab), tuple(config.sample.prompts)
    from starflow2_jax.data.digits import NUM_CLASSES, digit_captions

    vocab = tuple(config.model.text.vocab) or tuple(c for d in range(NUM_CLASSES) for c in digit_captions(d))
    prompts = tuple(config.sample.prompts) or tuple(digit_captions(d)[0] for d in range(NUM_CLASSES))
    return vocab, prompts
