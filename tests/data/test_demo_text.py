"""The digits demo's corpus (data.demo_text) and tokenizer (data.demo_tokenizer).

Oracles: ``pretzel.layout_document`` / ``pretzel.chat_items`` laying out the same document (the
token structure of images and chat turns), transformers' ``AutoTokenizer`` reading the written files,
and the model configs (``pretzel.tiny``, configs/starflow2.py, configs/lm.py) for the marker ids.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from starflow2_jax import pretzel
from starflow2_jax.config_files import load_config
from starflow2_jax.data import demo_text as dt
from starflow2_jax.data import demo_tokenizer as dk
from starflow2_jax.fae.latent_space import PatchesSpace
from starflow2_jax.train.tasks.starflow2_data import HFTokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def corpus():
    return dt.demo_corpus(seed=3, num_documents=600)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return dk.demo_tokenizer(corpus)


def _encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def test_corpus_is_deterministic_for_a_seed_and_holds_every_kind(corpus):
    assert dt.demo_corpus(seed=3, num_documents=600) == corpus
    assert dt.demo_corpus(seed=4, num_documents=600) != corpus
    assert {d.kind for d in corpus} == set(dt.KINDS)
    assert {d.kind for d in dt.demo_corpus(seed=0, num_documents=len(dt.KINDS))} == set(dt.KINDS)
    summary = dt.corpus_summary(corpus)
    assert summary["documents"] == 600 and sum(summary["kinds"].values()) == 600
    assert summary["images"] == sum(len(d.digits) for d in corpus) > 0


def said(d: int) -> str:
    """What the assistant says before drawing ``d``, written out here (demo_text.DRAWING)."""
    word = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][d]
    return f"{word}, a handwritten {word}"


def test_corpus_holds_the_scored_prompts_with_consistent_answers(corpus):
    """The wordings the scoring imports occur, and each answer / drawn digit follows from its prompt."""
    by_kind = {k: [d for d in corpus if d.kind == k] for k in dt.KINDS}
    names = dt.NUMBER_WORDS
    for doc in by_kind["question"]:
        (_, user), (_, answer) = doc.turns
        if isinstance(user[0], dt.DigitImage):
            assert user[1] == dt.QUESTION and answer == (names[user[0].digit],)
    for doc in by_kind["next_digit"]:
        (_, user), (_, answer) = doc.turns
        following = (user[0].digit + 1) % 10
        assert user[1] == dt.NEXT_DIGIT_PROMPT and answer == (said(following), dt.DigitImage(following))
    for doc in by_kind["draw"]:
        (_, (prompt,)), (_, answer) = doc.turns
        text, image = answer  # the assistant names the digit it draws (twice), then draws it
        assert text == said(image.digit)
        assert names[image.digit] in prompt or str(image.digit) in prompt
    for doc in by_kind["interleaved"]:
        (_, (prompt,)), (_, items) = doc.turns
        texts, images = items[0::2], items[1::2]
        assert list(texts) == [said(i.digit) for i in images]
        start, end = re.search(r"from (\w+) to (\w+),", prompt).groups()
        assert (names[images[0].digit], names[images[-1].digit]) == (start, end)
        steps = {b - a for a, b in zip([i.digit for i in images], [i.digit for i in images][1:])}
        assert steps == {1 if prompt.startswith("Count from") else -1 if "down" in prompt else 2}
    arithmetic = [d.turns[0][1][0] for d in by_kind["arithmetic"]]
    for sentence in arithmetic:
        a, op, b, _, result = sentence.split(" ")
        value = names.index(a) + (names.index(b) if op == "plus" else -names.index(b))
        assert names.index(result) == value
    drawn = [d.turns[0][1][0] for d in by_kind["draw"]]
    assert any(p.startswith("draw the digit ") for p in drawn)
    assert dt.DRAW_PROMPT.format(name="seven") == "draw the digit seven"
    assert dt.INTERLEAVED_PROMPTS[0] == "Count from one to four, drawing each number."


@pytest.mark.parametrize("grid", [(2, 2), (8, 8)])
def test_rendered_documents_are_the_pretzel_layout(corpus, tokenizer, grid):
    """render() + the tokenizer give exactly the token ids pretzel.layout_document gives the same document
    (plain items, or pretzel.chat_items with its default system turn)."""
    vlm = pretzel.tiny().vlm
    cfg = pretzel.PretzelConfig(vlm=vlm, latent=PatchesSpace(grid[0], grid[1], 1, 1), seq_len=2048,
                                max_images=8).validate()
    encode = _encode(tokenizer)
    assert dt.DEFAULT_SYSTEM == pretzel.layout.DEFAULT_SYSTEM
    seen = set()
    for doc in corpus[:120]:
        image = lambda d: pretzel.Image(np.zeros((grid[0], grid[1], 1), np.float32))  # noqa: E731
        if doc.chat:
            items = pretzel.chat_items([(role, [image(x) if isinstance(x, dt.DigitImage) else x for x in turn])
                                        for role, turn in doc.turns])
        else:
            items = [image(x) if isinstance(x, dt.DigitImage) else x for _, turn in doc.turns for x in turn]
        laid = pretzel.layout_document(cfg, items, encode=encode)
        ids = encode(dt.render(doc, grid[0] * grid[1]))
        np.testing.assert_array_equal(laid["tokens"], ids)
        assert int(np.sum(laid["slot"])) == len(doc.digits) * grid[0] * grid[1]
        seen.add(doc.kind)
    assert seen == set(dt.KINDS)


def test_tokenizer_round_trip_and_markers(corpus, tokenizer):
    encode = _encode(tokenizer)
    for doc in corpus:
        text = dt.render(doc, 4)
        assert tokenizer.decode(encode(text), skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size(with_added_tokens=True) == dk.VOCAB_SIZE
    for name, i in dk.SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(name) == i
        assert encode(f"a{name}b") == encode("a") + [i] + encode("b")
    assert dk.demo_tokenizer(corpus).to_str() == tokenizer.to_str()  # deterministic
    summary = dt.corpus_summary(corpus, encode=encode, num_slots=4)
    assert summary["tokens"] == sum(len(encode(dt.render(d, 4))) for d in corpus)
    assert summary["text_tokens"] == summary["tokens"] - 6 * summary["images"]


def test_tokenizer_files_load_in_transformers_and_hf_tokenizer(corpus, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    directory = tmp_path / "tok"
    dk.write_tokenizer(tokenizer, directory)
    auto = AutoTokenizer.from_pretrained(os.fspath(directory))
    ours = HFTokenizer(os.fspath(directory))
    for doc in corpus[:80]:
        text = dt.render(doc, 4)
        ids = auto.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text) == _encode(tokenizer)(text)
        assert ours.decode(ids) == text
    assert auto.convert_tokens_to_ids("<|im_end|>") == auto.eos_token_id == dk.SPECIAL_TOKENS["<|im_end|>"]
    assert auto.pad_token_id == dk.SPECIAL_TOKENS["<|endoftext|>"]
    chat = auto.apply_chat_template([{"role": "user", "content": dt.DRAW_PROMPT.format(name="seven")}],
                                    tokenize=False, add_generation_prompt=True)
    doc = dt.DemoDocument("draw", (("user", ("draw the digit seven",)),))
    assert chat == dt.render(doc, 1) + "<|im_start|>assistant\n"
    with pytest.raises(FileExistsError):
        dk.write_tokenizer(tokenizer, directory)


def test_marker_ids_agree_with_the_model_configs():
    """One source: the tokenizer's ids are the ones pretzel.tiny, configs/starflow2.py (tiny, demo) and
    configs/lm.py give the VLM."""
    fields = dk.vlm_token_fields()
    tiny = pretzel.tiny().vlm
    assert {k: getattr(tiny, k) for k in fields} == fields
    for spec in ("starflow2.py:tiny,stage1", "starflow2.py:demo,stage1", "lm.py:tiny", "lm.py:demo"):
        vlm = load_config(os.fspath(CONFIGS / spec.split(":")[0]) + ":" + spec.split(":")[1])
        section = vlm.model.starflow2.vlm if "starflow2" in spec else vlm.model.lm.vlm
        values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section).items()}
        assert {k: values[k] for k in fields} == fields, spec


def test_corpus_weights_replace_the_kinds_they_name():
    """Kind shares follow the weights: counted against the expected shares (binomial, 5 sigma)."""
    n = 4000
    for weights in ({}, {"question": 6.0, "caption": 6.0, "next_digit": 3.0}, {"counting": 0.0}):
        expected = dict(dt.KIND_WEIGHTS, **weights)
        total = sum(expected.values())
        corpus = dt.demo_corpus(seed=5, num_documents=n, weights=weights)
        counts = {k: sum(d.kind == k for d in corpus[len(dt.KINDS):]) for k in dt.KINDS}
        for kind, weight in expected.items():
            p, m = weight / total, n - len(dt.KINDS)
            assert abs(counts[kind] - p * m) <= 5 * np.sqrt(m * p * (1 - p)) + 1e-9, (weights, kind, counts)
    assert dt.demo_corpus(seed=5, num_documents=50, weights={}) == dt.demo_corpus(seed=5, num_documents=50)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"num_documents=3: expected an int >= 7"):
        dt.demo_corpus(0, 3)
    with pytest.raises(ValueError, match=r"corpus weight of kind 'poem': expected kinds of"):
        dt.demo_corpus(0, 10, weights={"poem": 1.0})
    with pytest.raises(ValueError, match=r"corpus weight question=-1.0: expected a number >= 0"):
        dt.demo_corpus(0, 10, weights={"question": -1.0})
    with pytest.raises(ValueError, match=r"at least one must be positive"):
        dt.demo_corpus(0, 10, weights={k: 0.0 for k in dt.KINDS})
    with pytest.raises(ValueError, match=r"seed=-1"):
        dt.demo_corpus(-1, 10)
    with pytest.raises(ValueError, match=r"num_slots=0"):
        dt.image_placeholder(0)
    with pytest.raises(ValueError, match="no text to train on"):
        dk.train_tokenizer([])
    with pytest.raises(ValueError, match=r"counting prompt kind 'sideways'"):
        dt.count_numbers("sideways", 1, 3)
