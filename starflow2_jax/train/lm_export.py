"""An 'lm' run → a Hugging Face Qwen2.5-VL checkpoint (``starflow2 convert to-hf``).

The export is what a user's Qwen2.5-VL-7B directory is to STARFlow2: ``config.json``, hub-layout
safetensors (``convert.export_hf_qwen2_5_vl``) and the tokenizer files, loadable by
``transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained`` / ``AutoTokenizer`` and by
``convert.load_hf_qwen2_5_vl`` (so ``model.starflow2.vlm_checkpoint`` may name it). The text decoder
is the run's latest complete step (EMA parameters when the run kept them), in float32; so is the
vision tower of a run that trained it (``model.lm.images='digits'``), which also gets a
``preprocessor_config.json`` (the tower's patch, merge and temporal sizes, 8×8 pixels) with which
transformers' image processor turns a digit into the pixel values training read; a text-only run's
tower is written as initialised from the run's seed (``model.lm.vision``'s sizes). The tokenizer is
the run's: the demo tokenizer trained again from the corpus and checked against the SHA-256 the run
recorded, or the files of its tokenizer directory.

Every check runs before anything is written, and the output directory appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from starflow2_jax.atomic import check_output_directory
from starflow2_jax.train.tasks import lm

VISION_SEED_OFFSET = 18  # the tower's key: fold_in(key(seed), 18), as starflow2.random_vision's


def _lm_run_config(workdir):
    """The stored config of ``workdir``'s latest complete step; ValueError unless it is an 'lm' run."""
    from starflow2_jax.train import restore

    _, step_dir = restore.latest_step_dir(workdir)
    config = restore.read_step_config(step_dir)
    if config.model.family != "lm":
        raise ValueError(f"--workdir {os.fspath(workdir)!r} holds a model.family={config.model.family!r} run; "
                         f"to-hf exports an 'lm' run (configs/lm.py)")
    return config


def _checked_tokenizer(config):
    """The run's tokenizer, checked against the SHA-256 it recorded (ValueError naming both)."""
    section = config.model.lm
    tokenizer = lm.tokenizer_of(section)
    digest = lm.tokenizer_sha256(tokenizer)
    if section.tokenizer_sha256 and digest != section.tokenizer_sha256:
        raise ValueError(f"the tokenizer of the run (model.lm.tokenizer={section.tokenizer!r}) is not the one it "
                         f"trained with: SHA-256 {digest} here, {section.tokenizer_sha256} recorded (another "
                         f"tokenizers version trains the demo tokenizer differently, or the directory changed)")
    return tokenizer


def export_lm_run(workdir: os.PathLike | str, out_dir: os.PathLike | str) -> dict:
    """Exports the 'lm' run in ``workdir`` to ``out_dir`` (see the module docstring). Returns a summary:
    ``{out, workdir, step, text_parameters, vision_parameters, vocab_size, tokenizer_sha256}``.

    Raises FileExistsError (``out_dir`` exists and is not empty), FileNotFoundError (no workdir or no
    complete checkpoint), ValueError (not an 'lm' run; a tokenizer that changed); nothing is written then.
    """
    from starflow2_jax.convert.hf_qwen import export_hf_qwen2_5_vl
    from starflow2_jax.data.demo_tokenizer import write_tokenizer
    from starflow2_jax.train import restore
    from starflow2_jax.vlm.config import QwenVLConfig
    from starflow2_jax.vlm.vision import init_vision_params

    out_dir = check_output_directory(out_dir)
    config = _lm_run_config(workdir)
    tokenizer = _checked_tokenizer(config)
    restored = restore.restore_workdir(workdir)
    section = restored.config.model.lm
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), restored.params)
    vlm_config = dataclasses.replace(lm.vlm_config_from(section), dtype="float32", remat="none")
    vision_config = lm.vision_config_from(section)
    trained_tower = section.get("images", "none") == "digits"
    if trained_tower:
        text, vision = params["text"], params["vision"]
    else:
        text = params
        vision = init_vision_params(vision_config, jax.random.fold_in(jax.random.key(int(restored.config.seed)),
                                                                      VISION_SEED_OFFSET))
        vision = jax.tree.map(lambda x: np.asarray(x, np.float32), vision)
    hf_config = QwenVLConfig(text=vlm_config, vision=vision_config)
    with tempfile.TemporaryDirectory(prefix="lm_tokenizer_") as tmp:
        if section.tokenizer == "demo":
            tokenizer_dir = Path(tmp) / "tokenizer"
            write_tokenizer(tokenizer, tokenizer_dir)
        else:
            tokenizer_dir = Path(section.tokenizer)
        if trained_tower:  # the processor files beside the tokenizer's (export copies both)
            staged = Path(tmp) / "with_processor"
            shutil.copytree(tokenizer_dir, staged)
            digits_image_processor(vision_config).save_pretrained(str(staged))
            tokenizer_dir = staged
        export_hf_qwen2_5_vl(hf_config, {"text": text, "vision": vision}, out_dir, tokenizer_dir=tokenizer_dir)
    count = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))  # noqa: E731
    return dict(out=os.fspath(out_dir), workdir=os.fspath(workdir), step=int(restored.step),
                text_parameters=count(text), vision_parameters=count(vision), vision_trained=trained_tower,
                vocab_size=vlm_config.vocab_size, tokenizer_sha256=lm.tokenizer_sha256(tokenizer))


def digits_image_processor(vision_config):
    """transformers' ``Qwen2VLImageProcessorPil`` for the 8×8 digits: the tower's patch / merge / temporal
    sizes, min = max = 64 pixels (so a digit is never resized), the default normalisation."""
    from transformers import Qwen2VLImageProcessorPil

    pixels = lm.DIGIT_SIZE * lm.DIGIT_SIZE
    return Qwen2VLImageProcessorPil(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                                    temporal_patch_size=vision_config.temporal_patch_size, min_pixels=pixels,
                                    max_pixels=pixels)
