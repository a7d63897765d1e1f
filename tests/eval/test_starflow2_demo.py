"""The STARFlow2 digits demo's scoring (``eval.starflow2_demo``) on the runlocal chain (``demo_chain``).

Oracles: the training data's own layout (a stage-3 training document drawn by ``DigitsDocuments`` and laid
out by ``LayoutPreprocess``) for the prompts; hand-built token sequences and answers for the parsers;
hand-written expectations for what the counting and next-digit documents ask; the issue's list of
sections and a schema written out here for the outputs, cross-checked against the saved samples (the
judge re-run on them, the confusion table recounted from the saved answers).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from demo_chain import json_numbers

from starflow2_jax.data import demo_text as dt
from starflow2_jax.eval import starflow2_demo as sd
from starflow2_jax.eval import starflow2_prompts as sp

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_chain")]  # one worker builds the session chain once
SMALL = ["--samples-per-digit", "3", "--grid-per-digit", "2", "--seeds", "2", "--held-out", "12", "--edit", "12"]
SECTION_KEYS = {
    "text_to_image": {"prompt", "prompt_text", "guidance", "image_temperature", "samples_per_digit", "judge",
                      "accuracy", "variety", "novelty", "grids", "npz", "replies", "reply_names_digit",
                      "reply_opens_image"},
    "bits_per_dim": {"value", "std_error", "num_images", "split", "levels", "dequantisation", "passes",
                     "text_nll_per_token", "context"},
    "understanding": {"question", "num_images", "accuracy", "unparsed", "confusion", "wrong_examples",
                      "seconds_per_question", "npz"},
    "interleaved": {"prompts", "temperature", "guidance", "image_temperature", "structure", "image_accuracy",
                    "image_accuracy_all", "images", "transcripts", "npz"},
    "next_digit": {"prompt", "num_images", "accuracy", "per_class_accuracy", "images_drawn", "word_accuracy",
                   "image_matches_word", "guidance", "image_temperature", "seconds_per_image", "png", "npz"},
    "cache_check": {"max_abs_difference", "prompt", "seed", "positions", "images", "guided"},
    "timings": {"stages", "scoring", "scoring_seconds", "demo_seconds"},
}


def _demo_dir(chain: Path, where: Path) -> Path:
    """A demo workdir holding the chain's final stage (linked: the chain stays read-only)."""
    where.mkdir()
    shutil.copy(chain / "demo.json", where / "demo.json")
    os.symlink(chain / "stage3", where / "stage3")
    return where


@pytest.fixture(scope="module")
def scored(demo_chain, tmp_path_factory):
    """``(workdir, exit status, printed summary)`` of one scoring run at small counts."""
    import contextlib
    import io

    workdir = _demo_dir(demo_chain, tmp_path_factory.mktemp("scored") / "demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = sd.main(["--workdir", os.fspath(workdir), "--time", "stage1=100", "--time", "stage2=50.5"] + SMALL)
    return workdir, status, printed.getvalue()


def test_scoring_writes_every_section_and_finite_numbers(scored):
    workdir, status, printed = scored
    assert status == 0
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    for section, keys in SECTION_KEYS.items():
        assert set(metrics[section]) == keys, section
    assert set(metrics["checks"]) == set(sd.TARGETS) and metrics["targets"] == sd.TARGETS
    assert metrics["run"]["workdir"] == os.fspath(workdir / "stage3") and metrics["run"]["step"] == 2
    bad = [(p, v) for p, v in json_numbers(metrics) if not math.isfinite(v)]
    assert not bad, bad
    # sizes the flags asked for
    t2i = metrics["text_to_image"]
    assert t2i["judge"]["num_samples"] == 30 and t2i["prompt"] == dt.DRAW_PROMPT
    assert len(t2i["replies"]) == 10 and t2i["reply_names_digit"] == np.mean(
        [sp.parse_answer(w) == d for d, w in enumerate(t2i["replies"])])
    assert metrics["bits_per_dim"]["num_images"] == 297 and metrics["bits_per_dim"]["levels"] == 16
    assert metrics["understanding"]["num_images"] == 12 and metrics["next_digit"]["num_images"] == 12
    assert [p["prompt"] for p in metrics["interleaved"]["prompts"]] == list(dt.INTERLEAVED_PROMPTS)
    assert all(len(p["documents"]) == 2 for p in metrics["interleaved"]["prompts"])
    assert 0 <= metrics["cache_check"]["max_abs_difference"] <= 1e-4  # generation = teacher forcing
    times = metrics["timings"]
    assert times["stages"] == {"stage1": 100.0, "stage2": 50.5}
    assert set(times["scoring"]) >= {"text_to_image", "bits_per_dim", "understanding", "interleaved", "next_digit",
                                     "cache_check"}
    assert times["demo_seconds"] == pytest.approx(150.5 + times["scoring_seconds"])
    # one printed line per target, each with its verdict
    lines = printed.strip().splitlines()
    assert len(lines) == len(sd.TARGETS) and all(re.search(r"\b(met|MISSED|n/a)\)", line) for line in lines), lines
    assert "(guidance 0, image temperature 0.6; target >= 97%" in lines[0]


def test_the_images_are_drawn_at_the_runs_image_temperature(scored):
    """The run's stored ``sample.image_temperature`` (the demo preset's 0.6, read here from the stage's
    config.json) is what the scoring draws at: recorded beside the guidance in the run, text → image,
    interleaved and next-digit sections, the samples file and the report."""
    workdir, _, _ = scored
    stored = json.loads((workdir / "stage3" / "config.json").read_text())["sample"]["image_temperature"]
    assert stored == 0.6
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    for section in ("run", "text_to_image", "interleaved", "next_digit"):
        assert metrics[section]["image_temperature"] == stored and "guidance" in metrics[section], section
    with np.load(workdir / "scoring" / "t2i_samples.npz") as npz:
        assert float(npz["image_temperature"]) == stored
    page = (workdir / "report.html").read_text()
    assert "(guidance 0, image temperature 0.6)" in page and page.count("image temperature 0.6") >= 4


def test_the_outputs_agree_with_the_saved_samples(scored):
    """The judge re-run on the saved text → image samples and next digits, and the confusion table
    recounted from the saved answers, give the reported numbers."""
    from starflow2_jax.eval.digits import DigitsJudge

    workdir, _, _ = scored
    metrics = json.loads((workdir / "demo_metrics.json").read_text())
    judge = DigitsJudge()
    with np.load(workdir / "scoring" / "t2i_samples.npz") as npz:
        assert npz["samples"].shape == (30, 8, 8, 1)
        np.testing.assert_array_equal(npz["labels"], np.repeat(np.arange(10), 3))
        assert metrics["text_to_image"]["accuracy"] == judge.judge(npz["samples"], npz["labels"])["accuracy"]
    with np.load(workdir / "scoring" / "next_digit.npz") as npz:
        np.testing.assert_array_equal(npz["labels"], (npz["context_labels"] + 1) % 10)
        drawn = np.isfinite(npz["samples"]).all(axis=(1, 2, 3))  # NaN: no image drawn (counts as wrong)
        assert metrics["next_digit"]["images_drawn"] == drawn.sum()
        right = judge.predict(npz["samples"][drawn]) == npz["labels"][drawn] if drawn.any() else np.zeros(0, bool)
        assert metrics["next_digit"]["accuracy"] == right.sum() / 12
    with np.load(workdir / "scoring" / "understanding.npz") as npz:
        answered = [sp.parse_answer(str(a)) for a in npz["answers"]]
        confusion = np.zeros((10, 11), int)
        for label, got in zip(npz["labels"], answered):
            confusion[label, 10 if got is None else got] += 1
        assert metrics["understanding"]["confusion"] == confusion.tolist()
        assert metrics["understanding"]["accuracy"] == np.trace(confusion) / 12
    for name in ("t2i_grid_g0.png", "next_digit.png", "interleaved.npz", "interleaved_0.html", "interleaved_2.html",
                 "interleaved_0.png"):
        assert (workdir / "scoring" / name).is_file(), name


def test_the_report_holds_every_section_inline(scored):
    workdir, _, _ = scored
    page = (workdir / "report.html").read_text()
    from starflow2_jax.eval.starflow2_report import SECTIONS

    for section in SECTIONS:
        assert f'<h2 id="{section}">' in page, section
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert page.count('<div class="transcript">') == len(dt.INTERLEAVED_PROMPTS)
    assert 'data-kind="text"' in page and dt.QUESTION in page and dt.NEXT_DIGIT_PROMPT in page
    assert "nan" not in re.sub(r"<[^>]*>|base64,[A-Za-z0-9+/=]*", "", page).lower().split()


@pytest.fixture(scope="module")
def stage3_model(demo_chain):
    """``(PretzelConfig, encode)`` of the chain's stage 3 (its stored config; no parameters loaded)."""
    from starflow2_jax.train import families
    from starflow2_jax.train.restore import latest_step_dir, read_step_config

    task = families.make_task(read_step_config(latest_step_dir(demo_chain / "stage3")[1]))
    return task.config, task.encode


def _training_document(cfg, encode, kind: str, wanted):
    """A stage-3 training document of ``kind`` drawn as training draws it (``DigitsDocuments`` over the
    train split, ``LayoutPreprocess``) whose stored form satisfies ``wanted``; its layout dict."""
    from sklearn.datasets import load_digits

    from starflow2_jax.data import digits_documents as dd
    from starflow2_jax.data.digits import digits_split_indices
    from starflow2_jax.data.documents import DocumentPreprocess
    from starflow2_jax.train.tasks.starflow2_data import LayoutPreprocess

    digits, train = load_digits(), digits_split_indices()["train"]
    labels = digits.target[train]
    pool = dd.DigitsPool(digits.images[train].astype(np.uint8)[..., None], labels, train,
                         tuple(np.flatnonzero(labels == d) for d in range(10)))
    documents = dd.DigitsDocuments(pool, (kind,), "mixed", DocumentPreprocess(levels=16, noise="uniform",
                                                                              image_size=8, channels=1))
    layout = LayoutPreprocess(cfg, documents, encode, pairs="mixed")
    for seed in range(2000):
        if wanted(documents.stored(0, np.random.default_rng(seed))):
            return layout({"index": np.int64(0)}, np.random.default_rng(seed))
    raise AssertionError(f"no {kind} document found")


def _assert_prefix(prompt: dict, document: dict, extra: int = 0):
    """``prompt`` (plus ``extra`` = 1: a ``<|vision_start|>`` text_to_image appends) is the document's start."""
    n = len(prompt["tokens"])
    for key in ("tokens", "positions", "slot", "image_index"):
        np.testing.assert_array_equal(prompt[key], document[key][:n], err_msg=key)
    assert len(document["tokens"]) > n + extra


@pytest.mark.parametrize("digit", [0, 7, 8])
def test_the_draw_prompt_is_the_training_layout_prefix(stage3_model, digit):
    """"draw the digit seven" as the scoring asks it = a stage-3 'draw' document up to its
    ``<|vision_start|>``, token for token (text_to_image appends that token)."""
    cfg, encode = stage3_model
    words = dt.DRAW_PROMPT.format(name=dt.NUMBER_WORDS[digit])
    doc = _training_document(cfg, encode, "draw", lambda s: words in s["texts"])
    prompt = sp.draw_prompt(cfg, encode, digit, cut="image")
    _assert_prefix(prompt, doc, extra=1)
    n = len(prompt["tokens"])
    assert doc["tokens"][n] == cfg.vlm.vision_start_token_id and doc["positions"][n].tolist() == [
        int(prompt["positions"].max()) + 1] * 3
    # the scoring's cut: the assistant turn opened; the training document goes on with what the assistant
    # says before drawing ("seven, a handwritten seven")
    reply = sp.draw_prompt(cfg, encode, digit)
    _assert_prefix(reply, doc)
    name = dt.NUMBER_WORDS[digit]
    opened, word = encode("<|im_start|>assistant\n"), encode(f"{name}, a handwritten {name}")
    assert reply["tokens"][-len(opened):].tolist() == opened
    assert doc["tokens"][len(reply["tokens"]):n].tolist() == word


def test_the_question_next_digit_and_counting_prompts_are_training_prefixes(stage3_model):
    """Each ends with the assistant turn opened, the rest of the training document being the answer."""
    cfg, encode = stage3_model
    image = np.zeros((8, 8, 1), np.float32)
    opened = encode("<|im_start|>assistant\n")
    doc = _training_document(cfg, encode, "question", lambda s: True)
    prompts = [(sp.question_prompt(cfg, encode, image), doc)]
    doc = _training_document(cfg, encode, "next_digit", lambda s: True)
    prompts.append((sp.next_digit_prompt(cfg, encode, image), doc))
    doc = _training_document(cfg, encode, "interleaved", lambda s: dt.INTERLEAVED_PROMPTS[1] in s["texts"])
    prompts.append((sp.counting_prompt(cfg, encode, dt.INTERLEAVED_PROMPTS[1]), doc))
    for prompt, doc in prompts:
        _assert_prefix(prompt, doc)
        assert prompt["tokens"][-len(opened):].tolist() == opened
    n = len(prompts[-1][0]["tokens"])
    assert encode("nine") == prompts[-1][1]["tokens"][n:n + len(encode("nine"))].tolist()


def test_what_the_training_documents_ask():
    assert [sp.counting_expectation(p) for p in dt.INTERLEAVED_PROMPTS] == [[1, 2, 3, 4], [9, 8, 7, 6], [2, 4, 6, 8]]
    assert [sp.next_digit_target(d) for d in range(10)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    with pytest.raises(ValueError, match="'Count from one to twelve, drawing each number.'"):
        sp.counting_expectation("Count from one to twelve, drawing each number.")


@pytest.mark.parametrize("text,digit", [("seven", 7), ("seven<|im_end|>", 7), (" Seven.", 7), ("It is a three", 3),
                                        ("zero\n", 0), ("ten", None), ("seven eight", None), ("", None),
                                        ("sevenfold", None), ("7", None), ("seven, a handwritten seven", 7),
                                        ("seven, a handwritten eight", None)])
def test_answer_parser(text, digit):
    assert sp.parse_answer(text) == digit


# a toy vocabulary: words, the markers and <|im_end|> (what the parser sees of a generated turn)
VS, VE, PAD, END, HANDWRITTEN, NINE = 100, 101, 102, 103, 104, 105
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 9: " nine", NINE: "nine", 20: "!", HANDWRITTEN: ", a handwritten "}


def _decode(ids):
    return "".join(WORDS.get(i, {END: "<|im_end|>"}.get(i, "?")) for i in ids)


def _say(word):
    """What the training documents say before drawing a number: "two, a handwritten two"."""
    return [word, HANDWRITTEN, word]


def _image():
    return [VS] + [PAD] * 4 + [VE]


def _parse(tokens, expected=(1, 2, 3)):
    return sp.parse_interleaved(tokens, decode=_decode, vision_start=VS, vision_end=VE, end_tokens=[END],
                                expected=expected)


def test_structure_parser_accepts_the_right_structure():
    got = _parse([*_say(1), *_image(), *_say(2), *_image(), *_say(3), *_image(), END])
    assert got == dict(ok=True, reason=None, words=["one, a handwritten one", "two, a handwritten two",
                                                    "three, a handwritten three"], labels=[1, 2, 3], images=3)
    assert not _parse([1, *_image(), 2, *_image(), 3, *_image(), END])["ok"]  # the word alone is not what training says
    assert _parse([9, HANDWRITTEN, NINE, *_image(), END], expected=[9])["ok"]  # surrounding whitespace ignored


ONE, TWO, THREE, FOUR = (_say(n) for n in (1, 2, 3, 4))


@pytest.mark.parametrize("tokens,reason", [
    ([*ONE, *_image(), *TWO, 3, *_image(), END],
     "word 2 is 'two, a handwritten twothree': expected 'two, a handwritten two'"),
    ([*ONE, *_image(), *TWO, END], "image 2 missing (after 'two, a handwritten two')"),
    ([*ONE, *_image(), *TWO, *_image(), *FOUR, *_image(), END],
     "word 3 is 'four, a handwritten four': expected 'three, a handwritten three'"),
    ([*ONE, *_image(), 2, *_image(), *THREE, *_image(), END], "word 2 is 'two': expected 'two, a handwritten two'"),
    ([*ONE, *_image(), *TWO, *_image(), *THREE, *_image(), 20, END], "extra text '!<|im_end|>' before the end of turn"),
    ([*ONE, *_image(), *TWO, *_image(), *THREE, *_image()], "no end of turn"),
    ([*ONE, *_image(), *TWO, *_image(), *THREE, *_image(), *FOUR, *_image(), END], "4 images: expected 3"),
    ([*ONE, *_image(), *_image(), *TWO, *_image(), *THREE, *_image(), END],
     "word 2 is '': expected 'two, a handwritten two'"),
    ([END], "text '<|im_end|>' where 'one, a handwritten one' and an image were expected"),
    ([*ONE, *_image(), *TWO, VS, PAD], "unfinished image"),
])
def test_structure_parser_names_what_is_wrong(tokens, reason):
    got = _parse(tokens)
    assert not got["ok"] and got["reason"] == reason


def test_structure_parser_labels_images_by_the_words_before_them():
    got = _parse([*FOUR, *_image(), 20, *_image(), *TWO, *_image(), END])
    assert got["labels"] == [4, None, 2] and not got["ok"]
    assert got["words"] == ["four, a handwritten four", "!", "two, a handwritten two"]


@pytest.mark.parametrize("broken,named", [
    ("no_demo_json", "demo.json"), ("wrong_kind", "demo.json"), ("no_stage3", "stage3"),
    ("no_summary", "train_summary.json"), ("interrupted", "train_summary.json"), ("stage2_as_stage3", "config.json"),
])
def test_bad_workdir_exits_1_naming_the_file_and_writes_nothing(demo_chain, tmp_path, capsys, broken, named):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    if broken != "no_demo_json":
        kind = "starflow2-flow-demo" if broken == "wrong_kind" else "starflow2-digits-demo"
        (workdir / "demo.json").write_text(json.dumps({"kind": kind}))
    if broken == "stage2_as_stage3":
        os.symlink(demo_chain / "stage2", workdir / "stage3")
    elif broken != "no_stage3":
        (workdir / "stage3").mkdir()
        for name in ("config.json", "checkpoints"):
            os.symlink(demo_chain / "stage3" / name, workdir / "stage3" / name)
        if broken != "no_summary":
            (workdir / "stage3" / "train_summary.json").write_text(json.dumps({"interrupted": broken == "interrupted"}))
    before = sorted(p.name for p in workdir.iterdir())
    assert sd.main(["--workdir", os.fspath(workdir)] + SMALL) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err, err
    assert sorted(p.name for p in workdir.iterdir()) == before  # no scoring/, demo_metrics.json, report.html


def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sd.main(["--workdir", os.fspath(tmp_path), "--grid-per-digit", "5", "--samples-per-digit", "3"])
    assert exit_.value.code == 2 and "--grid-per-digit 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sd.main(["--workdir", os.fspath(tmp_path), "--held-out", "298"])
    assert "--held-out 298: the test split holds 297 digits" in capsys.readouterr().err
