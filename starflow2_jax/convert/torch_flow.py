"""Apple's PyTorch TarFlow (``"apple-tarflow"``) and STARFlow (``"apple-starflow"``) checkpoints ↔ our variables.

Each layout is ONE table of rules listed in the reference ``state_dict()`` order (TORCH_LAYOUTS §3).
A parameter rule applies exactly when the Flax parameters it names exist for the config (e.g.
``attention.norm.bias`` iff LayerNorm, ``qkv.bias`` iff use_bias), so the tables carry no option
logic: the torch keys a config expects are its table expanded over the config's parameter tree.
Transforms are pure transposes/reshapes/concatenations, so both directions are bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict
from typing import Callable, Iterator, Mapping

import jax
import numpy as np

from starflow2_jax.convert.state_dict import load_state_dict
from starflow2_jax.flow import api
from starflow2_jax.flow.config import FlowConfig, starflow_config, tarflow_config

VarPath = tuple[str, ...]  # a path in our variables tree


# ---- transforms: our arrays (per layer) ↔ one torch array ------------------------------------
@dataclasses.dataclass(frozen=True)
class Transform:
    """``to_torch(arrays)``, ``from_torch(array, our_shapes) -> arrays`` and ``shape(our_shapes)``
    (the torch shape), where ``arrays``/``our_shapes`` follow the rule's list of our paths."""

    to_torch: Callable
    from_torch: Callable
    shape: Callable


def _insert_ones(shape, axes) -> tuple:
    out = list(shape)
    for axis in sorted(axes):
        out.insert(axis, 1)
    return tuple(out)


def unsqueeze(*axes: int) -> Transform:
    """torch keeps singleton dims we drop: class_embed (n, 1, D), sos_embed (1, 1, d)."""
    return Transform(lambda a: np.expand_dims(a[0], axes), lambda t, s: [t.reshape(s[0])],
                     lambda s: _insert_ones(s[0], axes))


SAME = Transform(lambda a: a[0], lambda t, s: [t], lambda s: tuple(s[0]))
# Dense kernel (in, out) ↔ torch Linear weight (out, in).
LINEAR = Transform(lambda a: a[0].T, lambda t, s: [t.T], lambda s: tuple(s[0][::-1]))


def _fuse_qkv_weight(arrays):
    return np.concatenate([x.reshape(x.shape[0], -1) for x in arrays], axis=1).T


def _split_qkv_weight(t, shapes):
    cuts = np.cumsum([math.prod(s[1:]) for s in shapes])[:-1]
    return [part.T.reshape(s) for part, s in zip(np.split(t, cuts, axis=0), shapes)]


def _split_qkv_bias(t, shapes):
    cuts = np.cumsum([math.prod(s) for s in shapes])[:-1]
    return [part.reshape(s) for part, s in zip(np.split(t, cuts), shapes)]


# query/key/value kernels (D, heads, hd) ↔ fused qkv.weight, rows [q (H·hd) | k (Hkv·hd) | v (Hkv·hd)],
# head-major inside each part (row h·hd + j); biases (heads, hd) likewise.
QKV_WEIGHT = Transform(_fuse_qkv_weight, _split_qkv_weight,
                       lambda s: (sum(math.prod(x[1:]) for x in s), s[0][0]))
QKV_BIAS = Transform(lambda a: np.concatenate([x.reshape(-1) for x in a]), _split_qkv_bias,
                     lambda s: (sum(math.prod(x) for x in s),))
# attention output kernel (H, hd, D) ↔ proj.weight (D, H·hd).
OUT_WEIGHT = Transform(lambda a: a[0].reshape(-1, a[0].shape[-1]).T, lambda t, s: [t.T.reshape(s[0])],
                       lambda s: (s[0][-1], math.prod(s[0][:-1])))


# ---- rules -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Param:
    """torch key (relative to its scope) ↔ our paths (relative to the scope, '/'-separated)."""

    torch: str
    ours: tuple[str, ...]
    transform: Transform = SAME
    when: str | None = None  # one more path that must exist (mlp/wo is main.2 or down_proj)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """A torch buffer: its shape given the config, the constant it holds (``fill``: 'ones' | 'zeros' |
    'tril') and the variable of ours it mirrors, if any (optional on import)."""

    torch: str
    shape: Callable[[FlowConfig], tuple]
    fill: str
    ours: str | None = None


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Rules repeated for every block k: torch ``blocks.{k}.``, ours ``params/blocks_{k}/``."""

    rules: tuple


@dataclasses.dataclass(frozen=True)
class Layers:
    """Rules repeated for every layer l: torch ``attn_blocks.{l}.``, ours ``layers/…`` sliced at [l]."""

    rules: tuple


def P(torch: str, ours, transform: Transform = SAME, when: str | None = None) -> Param:
    return Param(torch, (ours,) if isinstance(ours, str) else tuple(ours), transform, when)


def _pt2(c: FlowConfig) -> int:  # STARFlow buffers are sized by pt_seq_len², not the image grid
    return int(round(c.rope_pt_seq_len)) ** 2


# Shared by both layouts (TarFlow uses the LayerNorm/GELU/bias subset), in registration order:
# attention (norm, qkv, proj, query_norm, key_norm, post_norm), then mlp (norm, post_norm, linears).
_LAYER_RULES = Layers((
    P("attention.norm.weight", "attn_norm/scale"),
    P("attention.norm.bias", "attn_norm/bias"),
    P("attention.qkv.weight", ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel"), QKV_WEIGHT),
    P("attention.qkv.bias", ("attn/query/bias", "attn/key/bias", "attn/value/bias"), QKV_BIAS),
    P("attention.proj.weight", "attn/out/kernel", OUT_WEIGHT),
    P("attention.proj.bias", "attn/out/bias"),
    P("attention.query_norm.weight", "attn/query_norm/scale"),
    P("attention.key_norm.weight", "attn/key_norm/scale"),
    P("attention.post_norm.weight", "attn_post_norm/scale"),
    P("mlp.norm.weight", "mlp_norm/scale"),
    P("mlp.norm.bias", "mlp_norm/bias"),
    P("mlp.post_norm.weight", "mlp_post_norm/scale"),
    P("mlp.main.0.weight", "mlp/wi/kernel", LINEAR),
    P("mlp.main.0.bias", "mlp/wi/bias"),
    P("mlp.main.2.weight", "mlp/wo/kernel", LINEAR, when="mlp/wi/kernel"),
    P("mlp.main.2.bias", "mlp/wo/bias", when="mlp/wi/kernel"),
    P("mlp.gate_proj.weight", "mlp/gate/kernel", LINEAR),
    P("mlp.gate_proj.bias", "mlp/gate/bias"),
    P("mlp.up_proj.weight", "mlp/up/kernel", LINEAR),
    P("mlp.up_proj.bias", "mlp/up/bias"),
    P("mlp.down_proj.weight", "mlp/wo/kernel", LINEAR, when="mlp/gate/kernel"),
    P("mlp.down_proj.bias", "mlp/wo/bias", when="mlp/gate/kernel"),
))

_TABLES = {
    # ml-tarflow transformer_flow.Model (TORCH_LAYOUTS §3.1).
    "apple-tarflow": (
        Buffer("var", lambda c: (c.num_tokens, c.token_dim), "ones", ours="prior/var"),
        Blocks((
            P("pos_embed", "pos_embed"),
            P("class_embed", "class_embed", unsqueeze(1)),
            Buffer("attn_mask", lambda c: (c.num_tokens,) * 2, "tril"),
            P("proj_in.weight", "proj_in/kernel", LINEAR),
            P("proj_in.bias", "proj_in/bias"),
            _LAYER_RULES,
            P("proj_out.weight", "proj_out/kernel", LINEAR),
            P("proj_out.bias", "proj_out/bias"),
        )),
    ),
    # ml-starflow transformer_flow.Model (TORCH_LAYOUTS §3.2, appendices D and E).
    "apple-starflow": (
        Buffer("var", lambda c: (_pt2(c), c.token_dim), "ones", ours="prior/var"),
        Blocks((
            P("sos_embed", "sos_embed", unsqueeze(0, 1)),
            P("pos_embed", "pos_embed"),
            Buffer("attn_mask", lambda c: (_pt2(c) + c.text_len,) * 2, "tril"),  # every block, text or not
            P("proj_in.weight", "proj_in/kernel", LINEAR),
            P("proj_in.bias", "proj_in/bias"),
            P("proj_out.weight", "proj_out/kernel", LINEAR),
            P("proj_out.bias", "proj_out/bias"),
            P("proj_txt.weight", "proj_txt/kernel", LINEAR),
            P("proj_txt.bias", "proj_txt/bias"),
            _LAYER_RULES,
            P("final_norm.weight", "final_norm/scale"),
        )),
        Buffer("feat_rope.freqs_cos", lambda c: (c.text_len + _pt2(c), c.blocks[0].head_dim), "zeros"),
        Buffer("feat_rope.freqs_sin", lambda c: (c.text_len + _pt2(c), c.blocks[0].head_dim), "zeros"),
    ),
}
LAYOUTS = tuple(_TABLES)


# ---- expansion of a table over a config ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple  # torch shape
    rule: Param | Buffer
    paths: tuple[VarPath, ...]  # full paths in our variables tree
    our_shapes: tuple  # per-layer shapes of those paths
    layer: int | None  # index into the stacked layer axis (None: not stacked)


def _expand(rules, config: FlowConfig, shapes: Mapping[VarPath, tuple], prefix: str = "",
            root: VarPath = (), block: int | None = None, layer: int | None = None) -> Iterator[_Entry]:
    for rule in rules:
        if isinstance(rule, Blocks):
            for k in range(len(config.blocks)):
                yield from _expand(rule.rules, config, shapes, f"blocks.{k}.", ("params", f"blocks_{k}"), k)
        elif isinstance(rule, Layers):
            for l in range(config.blocks[block].num_layers):
                yield from _expand(rule.rules, config, shapes, f"{prefix}attn_blocks.{l}.", root + ("layers",), block, l)
        elif isinstance(rule, Buffer):
            paths = (tuple(rule.ours.split("/")),) if rule.ours else ()
            yield _Entry(prefix + rule.torch, tuple(rule.shape(config)), rule, paths, (), None)
        else:
            paths = tuple(root + tuple(p.split("/")) for p in rule.ours)
            if not all(p in shapes for p in paths) or (rule.when and root + tuple(rule.when.split("/")) not in shapes):
                continue
            ours = tuple(shapes[p][1:] if layer is not None else shapes[p] for p in paths)
            yield _Entry(prefix + rule.torch, tuple(rule.transform.shape(ours)), rule, paths, ours, layer)


@functools.lru_cache(maxsize=16)
def _param_shapes(config: FlowConfig) -> dict[VarPath, tuple]:
    """Shapes of every variable ``api.init`` creates for ``config`` (traced, nothing allocated)."""
    tree = jax.eval_shape(lambda rng: api.init(config, rng), jax.random.PRNGKey(0))
    return {p: tuple(v.shape) for p, v in _flatten(tree).items()}


def _flatten(tree, root: VarPath = ()) -> dict[VarPath, object]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, root + (name,)))
        else:
            out[root + (name,)] = value
    return out


def _unflatten(flat: Mapping[VarPath, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _table(layout: str):
    if layout not in _TABLES:
        raise ValueError(f"unknown checkpoint layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    return _TABLES[layout]


def _fill(kind: str, shape: tuple) -> np.ndarray:
    if kind == "tril":
        return np.tril(np.ones(shape, np.float32))
    return (np.ones if kind == "ones" else np.zeros)(shape, np.float32)


def _describe(c: FlowConfig) -> str:
    b = c.blocks
    return (f"{len(b)} blocks, widths {[x.width for x in b]}, layers {[x.num_layers for x in b]}, "
            f"heads {[x.num_heads for x in b]} / kv {[x.num_kv_heads for x in b]} × head_dim {b[0].head_dim}, "
            f"d={c.token_dim} (C={c.in_channels}, p={c.patch_size}), T={c.num_tokens}, norm={c.norm}, "
            f"mlp={c.mlp}, use_bias={c.use_bias}")


# ---- export ----------------------------------------------------------------------------------
def export_torch_flow(config: FlowConfig, variables, layout: str) -> dict[str, np.ndarray]:
    """Our ``variables`` (``{'params', 'prior'}`` as ``api.init`` makes them) → the reference state dict.

    Returns every key ``load_state_dict(strict=True)`` needs, buffers included (``var`` from
    ``variables['prior']['var']``, ones if absent; ``attn_mask`` tril ones; STARFlow's deprecated
    ``feat_rope.freqs_cos/sin`` zeros), in the reference ``state_dict()`` order, as fresh float32
    numpy arrays with the torch shapes.
    """
    rules = _table(layout)
    shapes = _param_shapes(config)
    flat = {p: np.asarray(v) for p, v in _flatten(variables).items()}
    problems = [f"missing: {'/'.join(p)}" for p in shapes if p not in flat and p != ("prior", "var")]
    problems += [f"unexpected: {'/'.join(p)}" for p in flat if p not in shapes]
    problems += [f"{'/'.join(p)}: got shape {flat[p].shape}, expected {s}" for p, s in shapes.items()
                 if p in flat and flat[p].shape != s]
    if problems:
        raise ValueError(f"variables do not match the config ({_describe(config)}):\n  " + "\n  ".join(problems))
    entries = list(_expand(rules, config, shapes))
    _check_coverage(entries, shapes, layout)
    state_dict = {}
    for e in entries:
        if isinstance(e.rule, Buffer):
            value = flat.get(e.paths[0]) if e.paths else None
            if value is None or value.shape != e.shape:  # e.g. STARFlow with pt_seq_len ≠ grid: var is unused
                value = _fill(e.rule.fill, e.shape)
        else:
            value = e.rule.transform.to_torch([flat[p] if e.layer is None else flat[p][e.layer] for p in e.paths])
        state_dict[e.key] = np.array(value, dtype=np.float32)  # a contiguous, writable copy
    return state_dict


def _check_coverage(entries, shapes, layout: str) -> None:
    """Guards against the table drifting from the flow modules: every variable must be mapped."""
    unmapped = set(shapes) - {p for e in entries for p in e.paths}
    if unmapped:
        raise RuntimeError(f"the {layout} table maps no torch key to {sorted('/'.join(p) for p in unmapped)}: "
                           f"starflow2_jax/convert/torch_flow.py is out of sync with the flow modules")


# ---- import ----------------------------------------------------------------------------------
def import_torch_flow(state_dict, layout: str, **options) -> tuple[FlowConfig, dict]:
    """A reference state dict (mapping or file, see ``load_state_dict``) → ``(FlowConfig, variables)``.

    The config is inferred from the shapes (blocks, layers, widths, heads, norms, MLP kind, biases,
    text conditioning, …). ``options`` supply what the shapes cannot determine, and override any
    inferred value (the state dict is then checked against the result):

    * ``in_channels`` and/or ``patch_size``: the token dim d = C·p² only fixes one given the other
      (required unless d has no square factor, which forces p = 1); ``img_size``: default √T·p.
    * STARFlow: ``seq_order`` (default 'L2R'), ``soft_clip`` (4.0), ``use_softplus`` (True),
      ``head_dim`` (default: from qk-norm weights or the RoPE buffers, else 64), ``txt_size`` /
      ``pt_seq_len`` (default: from the buffers), and any other ``starflow_config`` argument.
    * TarFlow: any ``FlowConfig`` field as an override.

    Raises ValueError for an unknown layout, missing information, or a state dict that does not
    match the inferred config (listing every missing, unexpected and mis-shaped key). Buffers may be
    absent. Returns numpy float32 variables ``{'params': ..., 'prior': {'var': ...}}``.
    """
    rules = _table(layout)
    sd = load_state_dict(state_dict)
    config = _INFER[layout](sd, dict(options))
    shapes = _param_shapes(config)
    entries = list(_expand(rules, config, shapes))
    _check_state_dict(sd, entries, layout, config)
    _check_coverage(entries, shapes, layout)
    flat: dict[VarPath, np.ndarray] = {}
    stacked: dict[VarPath, dict[int, np.ndarray]] = defaultdict(dict)
    for e in entries:
        if isinstance(e.rule, Buffer):
            if e.paths:
                value = sd.get(e.key)
                shape = shapes[e.paths[0]]
                flat[e.paths[0]] = (np.array(value, np.float32) if value is not None and value.shape == shape
                                    else _fill(e.rule.fill, shape))
            continue
        parts = e.rule.transform.from_torch(np.asarray(sd[e.key], np.float32), e.our_shapes)
        for path, part in zip(e.paths, parts):
            if e.layer is None:
                flat[path] = np.array(part, np.float32)
            else:
                stacked[path][e.layer] = part
    for path, layers in stacked.items():
        flat[path] = np.stack([layers[l] for l in range(len(layers))]).astype(np.float32, copy=False)
    return config, _unflatten({p: flat[p] for p in shapes})


def _check_state_dict(sd: Mapping, entries, layout: str, config: FlowConfig) -> None:
    expected = {e.key: e for e in entries}
    missing = [k for k, e in expected.items() if k not in sd and not isinstance(e.rule, Buffer)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: got shape {tuple(sd[k].shape)}, expected {e.shape}" for k, e in expected.items()
             if k in sd and tuple(sd[k].shape) != e.shape]
    if missing or unexpected or wrong:
        lines = [f"state dict does not match the {layout} layout of the inferred config ({_describe(config)}); "
                 f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped:"]
        lines += [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {w}" for w in wrong]
        raise ValueError("\n".join(lines))


# ---- config inference ------------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_LAYER_KEY = re.compile(r"attn_blocks\.(\d+)\.(.+)")


def _blocks(sd: Mapping, layout: str) -> list[dict[str, tuple]]:
    """Per block: ``{key without 'blocks.k.': shape}``."""
    blocks: dict[int, dict] = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            blocks.setdefault(int(m[1]), {})[m[2]] = tuple(np.shape(value))
    if not blocks:
        raise ValueError(f"no 'blocks.<k>.*' entries: this is not an {layout} state dict")
    gaps = sorted(set(range(max(blocks) + 1)) - set(blocks))
    if gaps:
        raise ValueError(f"blocks {gaps} have no entries (0-layer identity blocks are not supported)")
    return [blocks[k] for k in range(len(blocks))]


def _layers(block: Mapping[str, tuple]) -> dict[int, dict[str, tuple]]:
    out: dict[int, dict] = {}
    for key, shape in block.items():
        m = _LAYER_KEY.fullmatch(key)
        if m:
            out.setdefault(int(m[1]), {})[m[2]] = shape
    return out


def _need(block: Mapping[str, tuple], k: int, name: str) -> tuple:
    if name not in block:
        raise ValueError(f"blocks.{k}.{name} is missing: it is needed to infer the config")
    return block[name]


def _layer_param(blocks, k: int, name: str) -> tuple:
    """Shape of ``name`` in the first layer of block k that has it."""
    for layer in sorted(_layers(blocks[k]).items()):
        if name in layer[1]:
            return layer[1][name]
    raise ValueError(f"blocks.{k}.attn_blocks.<l>.{name} is missing: it is needed to infer the config")


def _num_layers(block) -> int:
    layers = _layers(block)
    return max(layers) + 1 if layers else 0


def _channels_and_patch(d: int, options: dict) -> tuple[int, int]:
    """Splits the token dim d = C·p² using whichever of in_channels / patch_size is given."""
    c, p = options.pop("in_channels", None), options.pop("patch_size", None)
    options_ = [f"in_channels={d // q**2}, patch_size={q}" for q in range(1, math.isqrt(d) + 1) if d % q**2 == 0]
    if c is None and p is None:
        if len(options_) == 1:  # d has no square factor: p = 1
            return d, 1
        raise ValueError(f"the token dim d={d} = in_channels·patch_size² is ambiguous "
                         f"({'; '.join(options_)}): pass in_channels= or patch_size=")
    if c is None:
        c = d // p**2 if d % p**2 == 0 else None
    elif p is None:
        p = math.isqrt(d // c) if d % c == 0 and math.isqrt(d // c) ** 2 == d // c else None
    if c is None or p is None or c * p * p != d:
        raise ValueError(f"in_channels/patch_size do not fit the token dim d={d}; possible: {'; '.join(options_)}")
    return c, p


def _square_side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{what}: {tokens} tokens is not a square grid; pass img_size=(H, W)")
    return side


def _mlp_ratio(width: int, hidden: int) -> float:
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else float(np.nextafter(ratio, np.inf))


def _infer_tarflow(sd: Mapping, options: dict) -> FlowConfig:
    blocks = _blocks(sd, "apple-tarflow")
    width, d = _need(blocks[0], 0, "proj_in.weight")
    tokens = _need(blocks[0], 0, "pos_embed")[0]
    depths = sorted({_num_layers(b) for b in blocks})
    if len(depths) != 1:
        raise ValueError(f"TarFlow blocks must all have the same number of layers, found {depths}")
    out_rows = _need(blocks[0], 0, "proj_out.weight")[0]
    c, p = _channels_and_patch(d, options)
    img = options.pop("img_size", None) or _square_side(tokens, "pos_embed") * p
    kw = dict(in_channels=c, img_size=img, patch_size=p, channels=width, num_blocks=len(blocks),
              layers_per_block=depths[0], nvp=out_rows != d, num_classes=blocks[0].get("class_embed", (0,))[0])
    return tarflow_config(**{**kw, **options})


def _infer_starflow(sd: Mapping, options: dict) -> FlowConfig:
    blocks = _blocks(sd, "apple-starflow")
    widths = [_need(b, k, "proj_in.weight")[0] for k, b in enumerate(blocks)]
    d = blocks[0]["proj_in.weight"][1]
    # Layer options from the union over all layers: one stray key then shows up as one missing key.
    present = {name: shape for b in reversed(blocks) for layer in _layers(b).values() for name, shape in layer.items()}
    head_dim = options.pop("head_dim", None)
    if head_dim is None:
        if "attention.query_norm.weight" in present:
            head_dim = present["attention.query_norm.weight"][0]
        elif "feat_rope.freqs_cos" in sd:
            head_dim = np.shape(sd["feat_rope.freqs_cos"])[1]
        else:
            head_dim = 64
    heads = [_layer_param(blocks, k, "attention.proj.weight")[1] // head_dim for k in range(len(blocks))]
    kv_heads = [(_layer_param(blocks, k, "attention.qkv.weight")[0] // head_dim - h) // 2 for k, h in enumerate(heads)]
    swiglu = "mlp.gate_proj.weight" in present
    hidden = _layer_param(blocks, 0, "mlp.gate_proj.weight" if swiglu else "mlp.main.0.weight")[0]
    text_blocks = [k for k, b in enumerate(blocks) if "proj_txt.weight" in b]
    if text_blocks not in ([], [len(blocks) - 1], list(range(len(blocks)))):
        raise ValueError(f"text projections in blocks {text_blocks}: only the last block or every block "
                         f"(cond_top_only=1/0) can be text-conditioned")

    # Token count T = pt_seq_len² from var; attn_mask / freqs side = T + txt_size.
    c, p = _channels_and_patch(d, options)
    img, pt, txt_size = options.pop("img_size", None), options.pop("pt_seq_len", None), options.pop("txt_size", None)
    side = blocks[0].get("attn_mask", np.shape(sd["feat_rope.freqs_cos"]) if "feat_rope.freqs_cos" in sd else None)
    side = side[0] if side else None
    if "var" in sd:
        tokens = np.shape(sd["var"])[0]
    elif pt or img:
        tokens = round(pt) ** 2 if pt else ((img if isinstance(img, int) else img[0]) // p) ** 2
    elif side is not None and txt_size is not None:
        tokens = side - txt_size
    else:
        raise ValueError("cannot infer the token count (the state dict has no 'var' buffer): pass img_size=")
    if txt_size is None:
        if side is None:
            raise ValueError("cannot infer txt_size (no attn_mask / feat_rope buffers): pass txt_size=")
        txt_size = side - tokens
    pt_side = _square_side(tokens, "var")
    img = img or pt_side * p
    if pt is None and pt_side != (img if isinstance(img, int) else img[0]) // p:
        pt = pt_side  # buffers sized by a pt_seq_len that differs from the image grid

    kw = dict(
        in_channels=c, img_size=img, patch_size=p, channels=widths[0], layers_per_block=[_num_layers(b) for b in blocks],
        head_dim=head_dim, top_block_channels=widths[-1] if widths[-1] != widths[0] else None,
        num_heads=None if all(h == w // head_dim for h, w in zip(heads, widths)) else heads[0],
        num_kv_heads=None if kv_heads == heads else kv_heads[0],
        txt_size=txt_size, txt_dim=blocks[text_blocks[0]]["proj_txt.weight"][1] if text_blocks else 0,
        cond_top_only=len(text_blocks) != len(blocks) or len(blocks) == 1, sos="sos_embed" in blocks[0],
        use_final_norm="final_norm.weight" in blocks[0], use_swiglu=swiglu,
        norm_type=("layer_norm" if "attention.norm.bias" in present else
                   "rms_norm" if "attention.norm.weight" in present else "none"),
        use_qk_norm="attention.query_norm.weight" in present, use_post_norm="attention.post_norm.weight" in present,
        use_bias="attention.qkv.bias" in present, pt_seq_len=pt,
        seq_order="L2R", soft_clip=4.0, use_softplus=True)  # not in the weights: the released configs' values
    ratio = _mlp_ratio(widths[0], hidden)
    if ratio != 4.0:
        kw["mlp_ratio"] = ratio
    return starflow_config(**{**kw, **options})


_INFER = {"apple-tarflow": _infer_tarflow, "apple-starflow": _infer_starflow}
