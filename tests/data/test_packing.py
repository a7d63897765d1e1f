"""Packing documents into rows: hand-written rows (next-fit, first-fit), unpacking, limits, errors, exact resume."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from starflow2_jax.data import PackingSpec, make_packed_pipeline, pack, pack_documents, unpack_row

SPEC = PackingSpec(length=8, max_images=4,
                   token_fields={"tokens": 0, "positions": -7, "image_index": -1, "text_loss": False},
                   image_fields={"images": 0.5, "image_target": False}, bins=1)


def _document(tokens, image_index, images, targets, positions=None):
    tokens = np.asarray(tokens, np.int32)
    return {
        "tokens": tokens,
        "positions": np.stack([tokens, tokens + 1, tokens + 2], -1) if positions is None else positions,
        "image_index": np.asarray(image_index, np.int32),
        "text_loss": np.asarray(image_index, np.int32) < 0,
        "images": np.asarray(images, np.float32).reshape(-1, 2, 2, 1),
        "image_target": np.asarray(targets, bool),
    }


def _sized(length, count, first_token=1):
    """A document of ``length`` tokens (first_token, first_token+1, ...) and ``count`` images."""
    tokens = np.arange(first_token, first_token + length)
    index = np.full(length, -1)
    index[:count] = np.arange(min(count, length))
    return _document(tokens, index, [np.full(4, first_token + j) for j in range(count)], [True] * count)


A = _document([5, 6, 7], [-1, 0, 0], [[1, 2, 3, 4]], [True])
B = _document([8, 9, 10, 11], [0, -1, 1, 1], [[10, 20, 30, 40], [50, 60, 70, 80]], [False, True])


def test_two_documents_give_the_hand_written_row():
    row = pack_documents([A, B], SPEC)
    assert row["tokens"].tolist() == [5, 6, 7, 8, 9, 10, 11, 0]
    assert row["tokens"].dtype == np.int32
    assert row["positions"].tolist() == [[5, 6, 7], [6, 7, 8], [7, 8, 9], [8, 9, 10], [9, 10, 11], [10, 11, 12],
                                         [11, 12, 13], [-7, -7, -7]]
    assert row["image_index"].tolist() == [-1, 0, 0, 1, -1, 2, 2, -1]  # B's images follow A's one image
    assert row["text_loss"].tolist() == [True, False, False, False, True, False, False, False]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0] and row["segment_ids"].dtype == np.int32
    assert row["images"].reshape(4, 4).tolist() == [[1, 2, 3, 4], [10, 20, 30, 40], [50, 60, 70, 80], [.5] * 4]
    assert row["images"].shape == (4, 2, 2, 1) and row["images"].dtype == np.float32
    assert row["image_target"].tolist() == [True, False, True, False]
    assert row["image_segment_ids"].tolist() == [1, 2, 2, 0]
    assert row["image_valid"].tolist() == [True, True, True, False]


def _equal(first, second):
    return sorted(first) == sorted(second) and all(
        first[k].dtype == second[k].dtype and np.array_equal(first[k], second[k]) for k in first)


def test_unpacking_by_segment_gives_the_originals_back():
    documents = unpack_row(pack_documents([A, B], SPEC), SPEC)
    assert len(documents) == 2 and _equal(documents[0], A) and _equal(documents[1], B)
    alone = unpack_row(pack_documents([B], SPEC), SPEC)
    assert len(alone) == 1 and _equal(alone[0], B)


def test_greedy_sequential_rows_and_image_limit():  # SPEC.bins = 1
    # tokens: 3+4 fit (7), +2 would be 9 > 8 → new row; 2+6 = 8 fills it; then 1.
    docs = [_sized(3, 0), _sized(4, 0, 10), _sized(2, 0, 20), _sized(6, 0, 30), _sized(1, 0, 40)]
    rows = list(pack(grain.MapDataset.source(docs), SPEC))
    assert [row["segment_ids"].tolist() for row in rows] == [
        [1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0, 0, 0]]
    # images: 3 + 2 > 4 images, so the second document starts a new row although its tokens fit.
    rows = list(pack(grain.MapDataset.source([_sized(3, 3), _sized(2, 2, 10), _sized(1, 1, 20)]), SPEC))
    assert [row["image_segment_ids"].tolist() for row in rows] == [[1, 1, 1, 0], [1, 1, 2, 0]]
    assert rows[1]["image_index"].tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


def test_first_fit_rounds_fill_earlier_rows():
    # bins=2: 5 → row 1; 6 does not fit row 1 → row 2; 3 → row 1 (8); 2 → row 2 (8); 4 fits neither: round
    # ends, rows 1 and 2 are emitted and 4 opens the next round, where 1 joins it; then the stream ends.
    docs = [_sized(5, 0, 10), _sized(6, 0, 20), _sized(3, 1, 30), _sized(2, 0, 40), _sized(4, 0, 50),
            _sized(1, 1, 60)]
    rows = list(pack(grain.MapDataset.source(docs), PackingSpec(**{**SPEC.__dict__, "bins": 2})))
    assert [row["tokens"].tolist() for row in rows] == [
        [10, 11, 12, 13, 14, 30, 31, 32], [20, 21, 22, 23, 24, 25, 40, 41], [50, 51, 52, 53, 60, 0, 0, 0]]
    assert [row["segment_ids"].tolist() for row in rows] == [
        [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 0, 0, 0]]
    assert rows[0]["image_index"].tolist() == [-1] * 5 + [0, -1, -1]
    assert rows[2]["image_index"].tolist() == [-1] * 4 + [0, -1, -1, -1]
    assert rows[2]["images"][0].ravel().tolist() == [60] * 4


def test_packed_stream_unpacks_to_the_document_stream():
    rng = np.random.default_rng(0)
    docs = [_sized(int(rng.integers(1, 9)), 0, 100 * i) for i in range(30)]
    docs = [_sized(len(d["tokens"]), int(rng.integers(0, min(len(d["tokens"]), 4) + 1)), 100 * i)
            for i, d in enumerate(docs)]
    unpacked = [doc for row in pack(grain.MapDataset.source(docs), SPEC) for doc in unpack_row(row, SPEC)]
    assert len(unpacked) == len(docs) and all(_equal(a, b) for a, b in zip(unpacked, docs))
    first_fit = PackingSpec(**{**SPEC.__dict__, "bins": 4})  # reorders between rows: compare by first token
    unpacked = [doc for row in pack(grain.MapDataset.source(docs), first_fit) for doc in unpack_row(row, SPEC)]
    by_first = {int(doc["tokens"][0]): doc for doc in unpacked}
    assert len(unpacked) == len(by_first) == len(docs) and all(_equal(by_first[int(d["tokens"][0])], d) for d in docs)


def test_too_long_documents_raise_or_are_dropped_and_counted():
    docs = [_sized(3, 0), _sized(9, 0, 10), _sized(2, 0, 20), _sized(2, 5, 30), _sized(1, 0, 40)]
    with pytest.raises(ValueError, match=r"document 1 of the stream: 9 tokens > row length 8"):
        list(pack(grain.MapDataset.source(docs), SPEC))
    with pytest.raises(ValueError, match=r"document 2 of the stream: 5 images > max_images 4"):
        list(pack(grain.MapDataset.source([docs[0], docs[2], docs[3]]), SPEC))
    drop = PackingSpec(**{**SPEC.__dict__, "overflow": "drop"})
    iterator = iter(pack(grain.MapDataset.source(docs), drop))
    row = next(iterator)  # documents 1 (9 tokens) and 3 (5 images) are skipped
    assert row["tokens"].tolist() == [1, 2, 3, 20, 21, 40, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 3, 0, 0]
    assert iterator.get_state()["dropped"] == 2
    with pytest.raises(StopIteration):
        next(iterator)


def test_bad_documents_and_specs_raise_clear_errors():
    cases = [
        ({**A, "tokens": np.zeros(0, np.int32), "positions": np.zeros((0, 3), np.int32),
          "image_index": np.zeros(0, np.int32), "text_loss": np.zeros(0, bool)}, r"empty document \(T = 0"),
        ({k: v for k, v in A.items() if k != "images"}, r"missing fields \['images'\]"),
        ({**A, "tokens": np.arange(4, dtype=np.int32)}, r"per-token fields have different lengths"),
        ({**A, "image_target": np.ones(2, bool)}, r"per-image fields have different counts"),
        ({**A, "image_index": np.asarray([-1, 0, 1], np.int32)}, r"'image_index' holds 1; .* \[0, 1\)"),
        ({**A, "image_index": np.asarray([-2, 0, 0], np.int32)}, r"'image_index' holds -2"),
        ({**A, "image_index": np.zeros(3, np.float32)}, r"'image_index' has dtype float32; expected integers"),
    ]
    for document, match in cases:
        with pytest.raises(ValueError, match=match):
            pack_documents([document], SPEC)
    with pytest.raises(ValueError, match=r"document 1: field 'tokens' is int64 .*expected int32"):
        pack_documents([A, {**B, "tokens": B["tokens"].astype(np.int64)}], SPEC)
    with pytest.raises(ValueError, match=r"document 1: field 'images' is float32 \(·, 4, 4, 1\)"):
        pack_documents([A, {**B, "images": np.zeros((2, 4, 4, 1), np.float32)}], SPEC)
    with pytest.raises(ValueError, match=r"2 documents hold 7 tokens and 3 images; a row holds 8 tokens and 2"):
        pack_documents([A, B], PackingSpec(**{**SPEC.__dict__, "max_images": 2}))
    spec_cases = [
        (dict(length=0), r"PackingSpec.length 0"),
        (dict(max_images=-1), r"PackingSpec.max_images -1"),
        (dict(index_field="slot"), r"index_field 'slot' is not one of the token fields"),
        (dict(image_fields={"tokens": 0}), r"field names \['tokens'\] are used twice"),
        (dict(image_fields={"segment_ids": 0}), r"field names \['segment_ids'\] are used twice"),
        (dict(overflow="truncate"), r"PackingSpec.overflow 'truncate'"),
    ]
    for change, match in spec_cases:
        with pytest.raises(ValueError, match=match):
            PackingSpec(**{**SPEC.__dict__, **change})


def _noisy_layout(example, rng):
    """A document whose values depend on the example and on the random draws (so a resume must replay them)."""
    length, count = int(example["length"]), int(example["count"])
    document = _sized(length, count, int(example["first"]))
    document["images"] = document["images"] + rng.standard_normal(document["images"].shape).astype(np.float32)
    return document


@pytest.mark.parametrize("bins, steps, emitted", [(1, 7, 0), (3, 6, 0), (3, 7, 2)])
def test_iterator_state_resumes_exactly_and_is_json(bins, steps, emitted):
    """Resume at a round boundary and in the middle of a round (``emitted`` rows of it already returned)."""
    rng = np.random.default_rng(1)
    source = [{"length": int(rng.integers(1, 9)), "count": 0, "first": 100 * i} for i in range(40)]
    for example in source:
        example["count"] = int(rng.integers(0, min(example["length"], 4) + 1))
    dataset = make_packed_pipeline(source, spec=PackingSpec(**{**SPEC.__dict__, "bins": bins}), batch_size=2,
                                   seed=5, shuffle=True, preprocess=_noisy_layout, num_epochs=None,
                                   process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(steps):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # grain checkpoints store the state as JSON
    assert state["emitted"] == emitted
    expected = [next(iterator) for _ in range(30)]  # crosses epoch boundaries (40 documents ≈ 12 batches)
    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(30)]):
        assert _equal(want, got)
    assert expected[0]["tokens"].shape == (2, 8) and expected[0]["images"].shape == (2, 4, 2, 2, 1)


def test_worker_processes_give_the_same_rows_and_resume():
    """mp_prefetch (worker_count > 0) preprocesses in workers; the rows equal the in-process ones (~10 s)."""
    source = [{"length": 1 + i % 8, "count": i % 3, "first": 100 * i} for i in range(40)]
    kwargs = dict(spec=PackingSpec(**{**SPEC.__dict__, "bins": 3}), batch_size=2, seed=5, shuffle=True,
                  preprocess=_noisy_layout, process_index=0, process_count=1)
    reference = iter(make_packed_pipeline(source, **kwargs))
    expected = [next(reference) for _ in range(12)]
    dataset = make_packed_pipeline(source, worker_count=1, **kwargs)
    iterator = iter(dataset)
    got = [next(iterator) for _ in range(4)]
    state = iterator.get_state()  # 8 rows = 2 of the third round
    got += [next(iterator) for _ in range(8)]
    assert all(_equal(want, have) for want, have in zip(expected, got))
    resumed = iter(dataset)
    resumed.set_state(state)
    assert all(_equal(want, next(resumed)) for want in expected[4:])


def test_processes_pack_disjoint_shards():
    source = [{"length": 3, "count": 1, "first": 100 * i} for i in range(10)]
    firsts = []
    for rank in (0, 1):
        rows = make_packed_pipeline(source, spec=SPEC, batch_size=2, seed=0, shuffle=True, preprocess=_noisy_layout,
                                    num_epochs=1, process_index=rank, process_count=2, drop_remainder=False)
        firsts.append({int(d["tokens"][0]) for batch in rows for i in range(len(batch["tokens"]))
                       for d in unpack_row({k: v[i] for k, v in batch.items()}, SPEC)})
    assert not firsts[0] & firsts[1] and firsts[0] | firsts[1] == {100 * i for i in range(10)}
    with pytest.raises(ValueError, match=r"make_packed_pipeline: global batch_size 3 is not divisible by"):
        make_packed_pipeline(source, spec=SPEC, batch_size=3, seed=0, shuffle=True, preprocess=_noisy_layout,
                             process_index=0, process_count=2)
