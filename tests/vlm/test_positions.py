"""Multimodal RoPE position ids against transformers' ``Qwen2_5_VLModel.get_rope_index`` (the oracle),
and the slot-grid API against the positions of an equivalent image."""

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLModel

from qwen_hf_tiny import END, IMAGE, START, VIDEO, hf_config, image_run, words
from starflow2_jax import vlm

MERGE = 2
TOKENS_PER_SECOND = 4


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2_5_VLModel(hf_config("gqa2_untied")).eval()


def video_run(grid):
    t, h, w = grid
    return [START] + [VIDEO] * (t * (h // MERGE) * (w // MERGE)) + [END]


def types_of(ids):
    return np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))


def check(hf_model, ids, image_grid_thw=None, attention_mask=None, video_grid_thw=None, second_per_grid_ts=None):
    """Our rope_index equals transformers' get_rope_index (positions at unpadded tokens, deltas)."""
    ids = np.asarray(ids)
    types = types_of(ids)
    t = lambda a, dtype=torch.long: None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    ref_pos, ref_delta = hf_model.get_rope_index(
        t(ids), mm_token_type_ids=t(types), image_grid_thw=t(image_grid_thw), video_grid_thw=t(video_grid_thw),
        second_per_grid_ts=t(second_per_grid_ts, torch.float32), attention_mask=t(attention_mask))
    pos, delta = vlm.rope_index(ids, types, image_grid_thw, MERGE, attention_mask, video_grid_thw=video_grid_thw,
                                second_per_grid_ts=second_per_grid_ts, tokens_per_second=TOKENS_PER_SECOND)
    assert pos.shape == (3,) + ids.shape and pos.dtype == np.int32 and delta.shape == (ids.shape[0],)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
    return pos, delta


def test_text_only(hf_model):
    pos, delta = check(hf_model, np.random.default_rng(0).integers(20, 1000, (2, 7)))
    np.testing.assert_array_equal(pos[:, 1], np.broadcast_to(np.arange(7), (3, 7)))
    np.testing.assert_array_equal(delta, [0, 0])


def test_one_image(hf_model):
    rng = np.random.default_rng(1)
    grid = [[1, 6, 4]]
    pos, delta = check(hf_model, [words(rng, 3) + image_run(grid[0]) + words(rng, 2)], grid)
    # the 3×2 merged grid starts after <|vision_start|> at position 4; text resumes at 4 + max(3, 2)
    np.testing.assert_array_equal(pos[:, 0, 4:10], [[4] * 6, [4, 4, 5, 5, 6, 6], [4, 5, 4, 5, 4, 5]])
    assert pos[0, 0, 10] == 7 and delta[0] == 9 + 1 - 13  # <|vision_end|> at 7, last word at 9; 13 tokens


def test_two_images_odd_grids(hf_model):
    rng = np.random.default_rng(2)
    grids = [[1, 4, 6], [1, 6, 2]]
    check(hf_model, [words(rng, 2) + image_run(grids[0]) + words(rng, 3) + image_run(grids[1]) + words(rng, 1)], grids)


def test_batch_left_padding_images_in_two_rows(hf_model):
    rng = np.random.default_rng(3)
    grids = [[1, 4, 6], [1, 2, 2], [1, 6, 2]]
    rows = [words(rng, 1) + image_run(grids[0]) + words(rng, 2) + image_run(grids[1]),
            words(rng, 4),
            image_run(grids[2]) + words(rng, 3)]
    length = max(map(len, rows)) + 1
    ids = np.zeros((3, length), np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    pos, _ = check(hf_model, ids, grids, attention_mask=mask)
    assert np.all(pos[:, mask == 0] == 0)


def test_video_and_image(hf_model):
    rng = np.random.default_rng(4)
    videos, images = [[2, 4, 4], [3, 2, 4]], [[1, 2, 6]]
    ids = [words(rng, 2) + video_run(videos[0]) + words(rng, 1) + image_run(images[0]) + words(rng, 2)
           + video_run(videos[1]) + words(rng, 1)]
    pos, _ = check(hf_model, ids, images, video_grid_thw=videos, second_per_grid_ts=[0.5, 1.3])
    # the second video's frames are tokens_per_second · 1.3 = 5.2 apart, truncated: 0, 5, 10 (+ start)
    start = ids[0].index(VIDEO, ids[0].index(END, ids[0].index(IMAGE)))
    np.testing.assert_array_equal(np.unique(pos[0, 0, start:start + 6]) - pos[0, 0, start], [0, 5, 10])
    check(hf_model, ids, images, video_grid_thw=videos)  # default: one second per grid step


@pytest.mark.parametrize("grid_h, grid_w", [(4, 4), (2, 3), (3, 1)])
def test_image_slot_positions_match_an_image(hf_model, grid_h, grid_w):
    prefix = 5
    ids = np.array([words(np.random.default_rng(5), prefix) + [IMAGE] * (grid_h * grid_w) + [21, 22]])
    grid = [[1, MERGE * grid_h, MERGE * grid_w]]
    pos, _ = check(hf_model, ids, grid)
    slots, next_text = vlm.image_slot_positions(prefix, grid_h, grid_w)
    np.testing.assert_array_equal(slots, pos[:, 0, prefix:prefix + grid_h * grid_w])
    assert next_text == pos[0, 0, prefix + grid_h * grid_w] == prefix + max(grid_h, grid_w)


def test_image_token_count_mismatch_names_both_numbers():
    ids = np.array([[30, START] + [IMAGE] * 5 + [END]])
    with pytest.raises(ValueError, match=r"5 image tokens .* describes 6 merged image tokens"):
        vlm.rope_index(ids, types_of(ids), [[1, 4, 6]], MERGE)
    with pytest.raises(ValueError, match=r"5 image tokens .* \[\] describes 0"):
        vlm.rope_index(ids, types_of(ids), None, MERGE)


def test_adjacent_images_without_separator_are_an_error():
    # totals agree (4 + 1 tokens) but one run of 5 image tokens cannot be split into the two grids
    ids = np.array([[30] + [IMAGE] * 5 + [31]])
    with pytest.raises(ValueError, match=r"a run of 5 consecutive image tokens.*\(1, 4, 4\) gives 4"):
        vlm.rope_index(ids, types_of(ids), [[1, 4, 4], [1, 2, 2]], MERGE)


def test_bad_shapes_and_types():
    ids = np.zeros((1, 4), np.int64)
    with pytest.raises(ValueError, match=r"image_grid_thw has shape \(3,\)"):
        vlm.rope_index(ids, ids, [1, 4, 4], MERGE)
    with pytest.raises(ValueError, match=r"mm_token_type_ids contains \[7\]"):
        vlm.rope_index(ids, np.full_like(ids, 7), None, MERGE)
    with pytest.raises(ValueError, match="attention_mask"):
        vlm.rope_index(ids, ids, None, MERGE, attention_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="grid 0x3"):
        vlm.image_slot_positions(0, 0, 3)
