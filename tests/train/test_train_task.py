"""FlowTask construction from a config, the caption vocabulary, and host-side batch preparation."""

import numpy as np
import pytest
from train_helpers import ToyTask, tiny_config

from starflow2_jax import flow
from starflow2_jax.train import FlowTask, Task, WordVocab, flow_config_from


def test_word_vocab_is_deterministic():
    vocab = WordVocab(["the number 7", "A handwritten digit seven.", "the digit seven"])
    assert vocab.words == ("<pad>", "<unk>", ".", "7", "a", "digit", "handwritten", "number", "seven", "the")
    assert WordVocab(reversed(["the number 7", "A handwritten digit seven.", "the digit seven"])).words == vocab.words
    np.testing.assert_array_equal(vocab.encode("The digit SEVEN!", 5), [9, 5, 8, 1, 0])  # '!' unknown, padded
    np.testing.assert_array_equal(vocab.encode("", 3), [0, 0, 0])  # dropped caption = all padding
    np.testing.assert_array_equal(vocab.encode("a a a a a", 2), [4, 4])  # truncated
    batch = vocab.encode_batch(np.array(["seven", ""]), 2)
    assert batch.dtype == np.int32 and batch.tolist() == [[8, 0], [0, 0]]
    with pytest.raises(ValueError, match="strings"):
        WordVocab(["ok", 3])


def test_flow_config_from_the_training_config():
    fc = flow_config_from(tiny_config(**{"model.flow.remat": "full", "model.flow.dtype": "bfloat16"}))
    assert (fc.remat, fc.dtype, fc.num_classes, fc.text_len) == ("full", "bfloat16", 0, 0)
    fc = flow_config_from(tiny_config(**{"model.conditioning": "caption", "model.text.max_len": 5,
                                         "model.text.dim": 12, "model.text.vocab": ("a b",)}))
    assert (fc.text_len, fc.text_dim) == (5, 12) and fc.blocks[-1].text_conditioned
    with pytest.raises(ValueError, match="model.flow.kwargs"):
        flow_config_from(tiny_config(**{"model.flow.kwargs.bogus": 1}))


def test_flow_task_checks_conditioning_and_prepares_batches():
    config = tiny_config(**{"model.conditioning": "caption", "model.text.max_len": 4, "model.text.dim": 8,
                            "model.text.vocab": ("a handwritten digit one", "the number 2")})
    task = FlowTask.from_config(config)
    assert isinstance(task, Task) and isinstance(ToyTask(), Task)
    assert task.grid_rows() == ["a handwritten digit one", "the number 2"]  # prompts default to the vocab texts
    batch = {"image": np.zeros((2, 8, 8, 1), np.float32), "label": np.array([1, -1], np.int32),
             "caption": np.array(["the number 2", ""]), "index": np.array([5, 6])}
    prepared = task.prepare_batch(batch)
    assert sorted(prepared) == ["image", "tokens"]
    assert prepared["tokens"].tolist() == [task.vocab.encode("the number 2", 4).tolist(), [0, 0, 0, 0]]
    label_task = FlowTask.from_config(tiny_config(**{"model.conditioning": "label", "model.flow.kwargs.num_classes": 10}))
    assert sorted(label_task.prepare_batch(batch)) == ["image", "label"]
    assert label_task.grid_rows() == [str(c) for c in range(10)]
    plain = flow.starflow_config(1, 8, 2, 64, layers_per_block=[1, 1], head_dim=32)
    with pytest.raises(ValueError, match="num_classes=0"):
        FlowTask(plain, "label")
    with pytest.raises(ValueError, match="no text-conditioned block"):
        FlowTask(plain, "caption", vocab=("a",))
    with pytest.raises(ValueError, match="no 'image' field"):
        FlowTask(plain).prepare_batch({"label": np.zeros(2)})
