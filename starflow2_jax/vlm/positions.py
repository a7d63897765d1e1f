"""Multimodal RoPE position ids (temporal, height, width), computed on the host as transformers does.

Text tokens advance one position per token on all three rows. A vision item of merged grid
(t, h, w) starting at text position ``s`` occupies t·h·w tokens in raster order (t, then rows,
then columns) with positions (s + t_i·interval, s + row, s + col); the text after it resumes at
``s + max(h, w)`` (transformers 5.24's ``Qwen2_5_VLModel.get_rope_index``: the temporal extent
does not advance the text position). Padding (attention_mask 0) gets position 0 on every row and
is skipped when counting.
"""

from __future__ import annotations

import itertools

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def vision_positions(start: int, grid_t: int, grid_h: int, grid_w: int, time_interval: float = 1.0) -> np.ndarray:
    """(3, t·h·w) int64 positions of a vision item whose *merged* grid is (t, h, w), starting at ``start``.

    Rows: temporal ``start + int(i·time_interval)``, height ``start + row``, width ``start + col``;
    columns in raster order (t, h, w). Images use ``time_interval = 1``.
    """
    # float32 like transformers' tensor math (seconds per grid are a float32 tensor); .long() truncates
    temporal = (np.arange(grid_t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64)
    t, h, w = np.meshgrid(temporal, np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.stack([t, h, w]).reshape(3, -1).astype(np.int64) + start


def image_slot_positions(start: int, grid_h: int, grid_w: int) -> tuple[np.ndarray, int]:
    """Positions of N = h·w image slots laid out as an h×w grid after text position ``start``.

    Returns ``(positions (3, h·w) int64, next_text_position)``: slot (r, c) (raster order) sits at
    (start, start + r, start + c), exactly where Qwen2.5-VL puts a one-frame image whose merged grid
    is h×w; the next text token goes to ``start + max(h, w)``.
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"image slot grid {grid_h}x{grid_w}: both sides must be positive")
    return vision_positions(start, 1, grid_h, grid_w), int(start + max(grid_h, grid_w))


def text_positions(start: int, length: int) -> np.ndarray:
    """(3, length) int64 positions of ``length`` text tokens from ``start`` (equal on all rows)."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)).copy()


def merged_tokens(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """Number of LLM tokens per vision item: t·h·w / merge² for each row of ``grid_thw`` (N, 3)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return grid[:, 0] * (grid[:, 1] // spatial_merge_size) * (grid[:, 2] // spatial_merge_size)


def rope_index(input_ids, mm_token_type_ids, image_grid_thw, spatial_merge_size: int, attention_mask=None, *,
               video_grid_thw=None, second_per_grid_ts=None, tokens_per_second: int = 4):
    """3-row multimodal RoPE position ids, exactly transformers 5.24's ``get_rope_index``.

    input_ids, mm_token_type_ids (0 text, 1 image, 2 video), attention_mask: (B, T) arrays.
    image_grid_thw / video_grid_thw: (N, 3) patch grids (before the spatial merge), consumed in
    order over the batch; second_per_grid_ts: (num_videos,) seconds per temporal grid step.
    Returns ``(position_ids (3, B, T) int32, rope_deltas (B,) int32)``, where ``rope_deltas[b]`` is
    max position + 1 − number of unpadded tokens (the offset of later text/decode positions).
    Raises ValueError when vision token counts do not match the grids.
    """
    input_ids = np.asarray(input_ids)
    types = np.asarray(mm_token_type_ids)
    if input_ids.ndim != 2 or types.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and mm_token_type_ids {types.shape}: expected equal (B, T)")
    batch, length = input_ids.shape
    mask = np.ones((batch, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match input_ids {input_ids.shape}")
    unknown = sorted(set(np.unique(types).tolist()) - {TEXT, IMAGE, VIDEO})
    if unknown:
        raise ValueError(f"mm_token_type_ids contains {unknown}; expected 0 (text), 1 (image) or 2 (video)")
    grids = {IMAGE: _grid(image_grid_thw, "image_grid_thw"), VIDEO: _grid(video_grid_thw, "video_grid_thw")}
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        tokens = int(np.sum((types == kind) & mask))
        expected = int(merged_tokens(grids[kind], spatial_merge_size).sum())
        if tokens != expected:
            raise ValueError(f"{tokens} {name} tokens in the input (mm_token_type_ids == {kind}) but "
                             f"{name}_grid_thw {grids[kind].tolist()} describes {expected} merged {name} tokens "
                             f"(t·h·w / {spatial_merge_size}²)")
    grid_iters = {IMAGE: iter(grids[IMAGE]), VIDEO: iter(grids[VIDEO])}
    seconds = iter(np.ones(length) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64))

    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    for b in range(batch):
        valid = types[b][mask[b]]
        pieces, current = [], 0
        for kind, group in itertools.groupby(valid.tolist()):
            size = len(list(group))
            if kind == TEXT:
                pieces.append(text_positions(current, size))
                current += size
                continue
            t, h, w = (int(v) for v in next(grid_iters[kind]))
            lh, lw = h // spatial_merge_size, w // spatial_merge_size
            if size != t * lh * lw:
                raise ValueError(f"batch row {b}: a run of {size} consecutive {'image' if kind == IMAGE else 'video'} "
                                 f"tokens, but its grid_thw ({t}, {h}, {w}) gives {t * lh * lw} merged tokens "
                                 f"(separate adjacent items with non-vision tokens)")
            interval = np.float32(tokens_per_second) * np.float32(next(seconds)) if kind == VIDEO else 1.0
            pieces.append(vision_positions(current, t, lh, lw, interval))
            current += max(h, w) // spatial_merge_size
        if pieces:
            row = np.concatenate(pieces, axis=1)
            position_ids[:, b, mask[b]] = row
            deltas[b] = row.max() + 1 - row.shape[1]
    return position_ids.astype(np.int32), deltas.astype(np.int32)


def _grid(grid_thw, name: str) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    grid = np.asarray(grid_thw, np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} has shape {grid.shape}: expected (num_items, 3) rows of (t, h, w)")
    return grid
