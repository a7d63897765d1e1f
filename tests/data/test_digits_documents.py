"""data.builder='digits_documents' (data.digits_documents + train.tasks.starflow2_data): the digits demo's
STARFlow2 documents.

Oracles: scikit-learn's own ``load_digits`` and ``train_test_split`` (the held-out indices, each image's
class and pixels), hand-written expectations of each kind's context / target flags, the language
model's text (``demo_text.render`` tokenised, and ``train.tasks.lm``'s layout of the same document),
``pretzel.chat_items`` (the model's own chat template) for the trained-text mask, and the stream of
documents the pipeline packs.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from starflow2_jax import pretzel
from starflow2_jax.config_files import load_config
from starflow2_jax.data import demo_text as dt
from starflow2_jax.data import digits_documents as dd
from starflow2_jax.data.documents import DocumentPreprocess
from starflow2_jax.data.packing import unpack_row
from starflow2_jax.train.tasks import lm
from starflow2_jax.train.tasks import starflow2 as sf2
from starflow2_jax.train.tasks import starflow2_data as sd


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The stage-0 tokenizer (the demo tokenizer of the LM corpus), as the export writes it."""
    from starflow2_jax.data.demo_tokenizer import write_tokenizer

    return write_tokenizer(lm._demo_tokenizer(0, 4000), tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def pool(digits_builder):
    return dd.DigitsPool.from_source(digits_builder.as_data_source("train"))


def _config(stage: str, tokenizer_dir, data_dir, *overrides):
    config = load_config(f"configs/starflow2.py:demo,{stage}", [f"model.starflow2.tokenizer={tokenizer_dir}",
                                                                f"data.data_dir={data_dir}", *overrides])
    return config


def _root(builder) -> str:
    """The data_dir the session's digits builder was prepared in (``<root>/starflow2_digits/1.0.0``)."""
    import os

    return os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))


def _held_out():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    _, test = train_test_split(np.arange(len(target)), test_size=297, stratify=target, random_state=0)
    return set(test.tolist())


def _stored(pool, pairs, count, seed=0):
    documents = dd.DigitsDocuments(pool, dd.KINDS_OF_PAIRS[pairs], pairs, DocumentPreprocess(levels=16))
    return [documents.stored(i, np.random.default_rng([seed, i])) for i in range(count)]


def _items(stored):
    texts, losses, images = iter(stored["texts"]), iter(stored["text_loss"]), iter(stored["image_target"])
    return [("text", next(texts), bool(next(losses))) if k == 0 else ("image", None, bool(next(images)))
            for k in stored["kinds"]]


# what each kind's items must be: (text loss of the words around the images, image targets in order)
def _expected_flags(kind, pairs, items):
    """Hand-written roles (SPEC §5.1): the flags the items of a document of ``kind`` must carry."""
    images = [t for k, _, t in items if k == "image"]
    words = [(text, loss) for k, text, loss in items if k == "text" and not text.startswith("<|")
             and text != "\n"]
    if kind == "caption":
        image_first = items[0][0] == "image"
        assert image_first == (pairs == "i2t") or pairs == "mixed"
        return images == [not image_first] and words[0][1] is True
    if kind == "draw":  # the assistant names the digit (trained), then draws it
        return images == [True] and [loss for _, loss in words] == [False, True]
    if kind == "question":
        return images == [False] and words == [(dt.QUESTION, False), (words[1][0], True)]
    if kind == "interleaved":
        return all(images) and 2 <= len(images) <= 4 and words[0][1] is False and all(loss for _, loss in words[1:])
    if kind == "next_digit":
        return images == [False, True] and words[0] == (dt.NEXT_DIGIT_PROMPT, False) and words[1][1] is True
    raise AssertionError(kind)


@pytest.mark.parametrize("pairs", ["t2i", "i2t", "mixed"])
def test_every_kind_of_the_stage_appears_with_its_context_and_target_flags(pool, pairs):
    stored = _stored(pool, pairs, 400)
    kinds = collections.Counter(s["document_kind"] for s in stored)
    assert set(kinds) == set(dd.KINDS_OF_PAIRS[pairs]), kinds
    for s in stored:
        items = _items(s)
        assert _expected_flags(s["document_kind"], pairs, items), (s["document_kind"], items)
        if s["document_kind"] != "caption":  # chat: the system turn is context, the assistant closes trained
            assert items[0] == ("text", f"<|im_start|>system\n{dt.DEFAULT_SYSTEM}<|im_end|>\n", False)
            assert items[-2:] == [("text", "<|im_end|>", True), ("text", "\n", False)]
    if pairs == "mixed":  # captions on both sides of their image
        assert {_items(s)[0][0] for s in stored if s["document_kind"] == "caption"} == {"text", "image"}


def test_no_held_out_digit_is_ever_used(pool, tokenizer_dir, digits_builder):
    held_out = _held_out()
    used = {int(i) for s in _stored(pool, "mixed", 1500) for i in s["image_source"]}
    assert len(used) > 1100 and not used & held_out  # most of the 1500, none of the 297
    assert set(pool.indices.tolist()).isdisjoint(held_out) and len(pool.indices) == 1500
    # the packed rows (pixels, not indices): every image is a train digit, none only a held-out one
    from sklearn.datasets import load_digits

    config = _config("stage3", tokenizer_dir, _root(digits_builder), "data.noise=none")
    pcfg = sf2.pretzel_config_from(config)
    data = iter(sd.make_train_data(config, "/nonexistent", pcfg))
    size = int(config.data.image_size)  # the stored 8×8 digits, nearest-resized when the preset asks for more
    digits = np.repeat(np.repeat(load_digits().images, size // 8, axis=1), size // 8, axis=2) / 8.0 - 1.0
    seen = 0
    for _ in range(3):
        batch = next(data)
        for image in batch["images"][batch["image_valid"]]:
            matches = np.flatnonzero(np.all(np.abs(digits - image[..., 0]) < 1e-6, axis=(1, 2)))
            assert len(matches) and not set(matches.tolist()) <= held_out
            seen += 1
    assert seen >= 60


def test_each_image_is_a_real_digit_of_the_class_its_words_name(pool):
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = {w: d for d, w in enumerate(dt.NUMBER_WORDS[:10])}

    def named(text):  # what the assistant says before drawing: "seven, a handwritten seven"
        first, second = text.split(", a handwritten ")
        assert first == second, text
        return names[first]

    for s in _stored(pool, "mixed", 400, seed=3):
        labels = digits.target[s["image_source"]].tolist()
        assert labels == s["digits"].tolist()
        for image, index in zip(s["images"], s["image_source"]):
            np.testing.assert_array_equal(image[..., 0], digits.images[index])
        items = _items(s)
        texts = [t for k, t, _ in items if k == "text"]
        kind = s["document_kind"]
        if kind == "question":
            assert names[texts[-3]] == labels[0]  # the answer, before <|im_end|>
        elif kind == "draw":
            prompt = texts[2]
            assert re.search(rf"\b({dt.NUMBER_WORDS[labels[0]]}|{labels[0]})\b", prompt), prompt
        elif kind == "interleaved":
            before = [items[k - 1][1] for k in range(len(items)) if items[k][0] == "image"]
            assert [named(w) for w in before] == labels
            numbers = [names[w] for w in re.findall(r"[a-z]+", texts[2]) if w in names]
            assert labels[0] == numbers[0] and labels[-1] == numbers[-1]
        elif kind == "next_digit":
            assert labels[1] == (labels[0] + 1) % 10 == named(items[-4][1])  # the words before the drawn image
        else:
            caption = next(t for k, t, _ in items if k == "text")
            assert dt.NUMBER_WORDS[labels[0]] in caption or str(labels[0]) in caption


def test_documents_are_the_language_models_text_and_the_chat_templates_loss(tokenizer_dir):
    """Token ids: ``encode(demo_text.render(doc, 64))`` and train.tasks.lm's layout of the same document;
    trained text: pretzel.chat_items' rule (assistant turns; plain documents all text)."""
    tok = sd.HFTokenizer(str(tokenizer_dir))
    config = sf2.pretzel_config_from(_config("stage3", tokenizer_dir, "/unused"))
    lm_layout = lm.LMLayout(lm.layout_config(config.vlm, config.grid, config.seq_len), tok.encode)
    blank = np.zeros(config.latent.image_shape, np.float32)
    checked = collections.Counter()
    for kind in dd.KINDS:
        for document in dd.document_space(kind, "mixed"):
            items = [pretzel.Text(i["text"], loss=i["loss"]) if "text" in i else pretzel.Image(blank, i["target"])
                     for i in dd.document_items(document)]
            ours = pretzel.layout_document(config, items, encode=tok.encode)
            assert ours["tokens"].tolist() == tok.encode(dt.render(document, config.num_slots))
            np.testing.assert_array_equal(ours["tokens"], lm_layout(document, None)["tokens"])
            if document.chat:
                messages = [(role, [blank if isinstance(x, dt.DigitImage) else x for x in xs])
                            for role, xs in document.turns]
                model = pretzel.layout_document(config, pretzel.chat_items(messages), encode=tok.encode)
                for key in ("tokens", "positions", "text_loss", "image_target"):
                    np.testing.assert_array_equal(ours[key], model[key], err_msg=key)
            else:
                assert ours["text_loss"].sum() > 0 and ours["text_loss"][ours["slot"]].sum() == 0
            checked[kind] += 1
    assert min(checked.values()) >= 10 and set(checked) == set(dd.KINDS)


def test_document_space_holds_every_drawn_document(pool):
    for pairs in ("t2i", "i2t", "mixed"):
        for kind in dd.KINDS_OF_PAIRS[pairs]:
            space = set(dd.document_space(kind, pairs))
            rng = np.random.default_rng(5)
            drawn = [dd.draw_document(kind, pairs, rng) for _ in range(300)]
            assert set(drawn) <= space, kind
    assert ("Count from one to four, drawing each number." in
            {d.turns[0][1][0] for d in dd.document_space("interleaved", "t2i")})
    assert set(dt.INTERLEAVED_PROMPTS) <= {d.turns[0][1][0] for d in dd.document_space("interleaved", "t2i")}


def _rows(config, count):
    data = iter(sd.make_train_data(config, "/nonexistent", sf2.pretzel_config_from(config)))
    return [next(data) for _ in range(count)]


def test_deterministic_per_seed_and_epoch_and_new_documents_each_epoch(tokenizer_dir, digits_builder):
    data_dir = _root(digits_builder)
    first = _rows(_config("stage1", tokenizer_dir, data_dir), 2)
    again = _rows(_config("stage1", tokenizer_dir, data_dir), 2)
    other = _rows(_config("stage1", tokenizer_dir, data_dir, "seed=1"), 2)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])
    # the transform draws from grain's per (seed, epoch, position) rng: position p of epoch 2 is another document
    documents = dd.DigitsDocuments(dd.DigitsPool.from_source(digits_builder.as_data_source("train")),
                                   dd.KINDS, "mixed", DocumentPreprocess(levels=16))
    import grain

    stream = grain.MapDataset.source(dd.index_source(20)).seed(0).random_map(documents).repeat(2)
    epoch1 = [stream[i]["image_source"].tolist() for i in range(20)]
    epoch2 = [stream[20 + i]["image_source"].tolist() for i in range(20)]
    assert epoch1 != epoch2 and epoch1 == [stream[i]["image_source"].tolist() for i in range(20)]


def test_packed_rows_hold_whole_documents_of_the_stream(tokenizer_dir, digits_builder):
    config = _config("stage3", tokenizer_dir, _root(digits_builder), "data.noise=none",
                     "model.starflow2.packing_bins=1")
    pcfg = sf2.pretzel_config_from(config)
    spec = sd.packing_spec(pcfg)
    unpacked = [doc for batch in _rows(config, 2) for row in range(batch["tokens"].shape[0])
                for doc in unpack_row({k: v[row] for k, v in batch.items()}, spec)]
    # the stream the pipeline packs: the same transform on the shuffled index source, position by position
    import grain

    encode = sd.make_tokenizer(config).encode
    source, documents = sd.digits_documents(config, "/nonexistent", pcfg, encode,
                                             DocumentPreprocess(levels=16, image_size=32))
    layout = sd.LayoutPreprocess(pcfg, documents, encode, pairs="mixed")
    stream = grain.MapDataset.source(source).seed(0).shuffle().random_map(layout)
    assert len(unpacked) > 16
    for i, doc in enumerate(unpacked):  # next-fit (bins=1): the rows are the stream, in order, cut at documents
        expected = stream[i]
        for key in ("tokens", "positions", "slot", "text_loss", "image_index", "images", "image_target"):
            np.testing.assert_array_equal(doc[key], expected[key], err_msg=f"document {i}: {key}")


def test_bad_input_names_the_field(tokenizer_dir, pool):
    with pytest.raises(ValueError, match=r"data\.kinds=\['drawing'\]: unknown kind 'drawing'"):
        dd.stage_kinds("mixed", ["drawing"])
    with pytest.raises(ValueError, match=r"data\.kinds=\['counting'\].*text-only"):
        dd.stage_kinds("t2i", ["counting"])
    with pytest.raises(ValueError, match=r"'question' is not read with model\.starflow2\.pairs='t2i'"):
        dd.stage_kinds("t2i", ["draw", "question"])
    with pytest.raises(ValueError, match=r"listed twice"):
        dd.stage_kinds("i2t", ["question", "question"])
    with pytest.raises(ValueError, match=r"DigitsDocuments\.kinds"):
        dd.DigitsDocuments(pool, ("nope",), "mixed", DocumentPreprocess(levels=16))
    with pytest.raises(ValueError, match=r"per epoch 0"):
        dd.index_source(0)
    config = _config("stage1", tokenizer_dir, "/unused", "model.starflow2.seq_len=100")
    pcfg = sf2.pretzel_config_from(config)
    with pytest.raises(ValueError, match=r"model\.starflow2\.seq_len=100: the longest 'interleaved' document .* is "
                                         r"\d+ positions"):
        sd.check_digits_documents_fit(pcfg, sd.make_tokenizer(config).encode, ("draw", "interleaved"), "t2i")
    sd.check_digits_documents_fit(pcfg, sd.make_tokenizer(config).encode, ("draw", "next_digit"), "t2i")  # fits


def test_stage2_rows_train_exactly_the_answers_and_the_captions(tokenizer_dir, digits_builder):
    """The trained positions of packed stage-2 rows predict the assistant's answer and its <|im_end|> (a
    question) or the caption after its image (image → caption), nothing else: read back from the tokens."""
    config = _config("stage2", tokenizer_dir, _root(digits_builder))
    pcfg = sf2.pretzel_config_from(config)
    tok = sd.HFTokenizer(str(tokenizer_dir))
    kinds = collections.Counter()
    for batch in _rows(config, 2):
        for row in range(batch["tokens"].shape[0]):
            for doc in unpack_row({k: v[row] for k, v in batch.items()}, sd.packing_spec(pcfg)):
                tokens, trained = doc["tokens"], doc["text_loss"]
                text = tok.decode(tokens[~doc["slot"]])
                predicted = tok.decode(tokens[1:][trained[:-1]])
                assert not trained[-1] and not doc["image_target"].any()
                if dt.QUESTION in text:
                    answer = text.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
                    assert answer in dt.NUMBER_WORDS[:10] and predicted == answer + "<|im_end|>", text
                    kinds["question"] += 1
                else:
                    assert text.startswith("<|vision_start|>")
                    assert predicted == text.split("<|vision_end|>", 1)[1], text
                    kinds["caption"] += 1
    assert kinds["question"] > 3 and kinds["caption"] > 3, kinds
