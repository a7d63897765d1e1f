"""Generation with shared caches (SPEC §5.2): text → image, image → text, and interleaved.

One prompt document (``layout.layout_document``; its images enter as context) is prefilled into fixed
size caches of ``length`` positions; then segments alternate, each ONE jitted function with ``lax``
loops (the host switches once per segment):

- a text segment samples tokens from LMHead(y_vlm + W_D·y_D) until a stop token, ``<|vision_start|>``
  (interleaved mode) or its budget, feeding each token into both caches;
- an image segment draws u_n = μ + σ·ε_n from the deep head (ε ~ N(0, T²·I): T the image temperature
  of ``text_to_image`` / ``interleaved``, 1 by default; Gaussian guidance with a batch-doubled
  cache whose unconditional half has its text masked out of attention), feeds u_n at slot n into both
  streams (VLM: E[<|image_pad|>] + Adapter(u_n); flow: P_in(u_n + W_vlm·y_vlm)), optionally in Jacobi
  blocks, then ``<|vision_end|>``; the image's latents are x = f_S⁻¹(u) (the shallow flows, through
  ``flow.sample_tokens``), optionally one score step, decoded by the latent space.

Nothing is re-encoded: the caches after generation equal those of one teacher-forced pass over the
final sequence (tested). Rows: text → image and image → text draw ``num_samples`` rows in lockstep;
interleaved generation runs one row (its segment structure is sampled).

The segment API the three modes are made of, public for a caller composing its own loop (the
benchmark's shared-cache and re-encoding paths use only these)::

    state = prefill(config, params, vlm_params, latent_vars, prompt, length=S, num_samples=B, guided=...)
    state = feed_token(config, params, vlm_params, state, config.vlm.vision_start_token_id)
    state, u, passes = image_segment(config, params, vlm_params, state, eps, guidance, jacobi=...)
    x = invert_shallow(config, params, u)                                   # latents (B, N, D)
    state, ids, count = text_segment(config, params, vlm_params, state, rng, max_tokens=T, ...)

``State`` carries both caches, the attention mask over them, the next text position and the last
position's stream outputs; each step function is jitted with static shapes.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import flow
from starflow2_jax.flow.block import sigma_from_preact, split_affine
from starflow2_jax.flow.guidance import guided_affine
from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.pretzel.losses import text_positions
from starflow2_jax.pretzel.model import Caches, Pretzel, _variables, create_caches, lm_logits
from starflow2_jax.pretzel.step import step
from starflow2_jax.vlm.generate import sample_logits


@flax.struct.dataclass
class State:
    """Generation state of R rows: R = B sample rows, or R = 2B with guidance ([conditional;
    unconditional], ``guided``).

    caches: both streams'; key_mask (R, S): keys each row may attend (the unconditional half hides its
    text); position (): the next text position; head (R, 2D): the deep head at the last position (it
    parametrises the next slot); y_vlm (R, Dv), y_deep (R, width): the streams at the last position;
    guided: whether the rows are doubled for guidance (static: part of the pytree's structure)."""

    caches: Caches
    key_mask: jax.Array
    position: jax.Array
    head: jax.Array
    y_vlm: jax.Array
    y_deep: jax.Array
    guided: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def rows(self) -> int:
        """R, the cache rows."""
        return self.head.shape[0]

    @property
    def num_samples(self) -> int:
        """B, the sample rows (R, or R / 2 with guidance)."""
        return self.rows // 2 if self.guided else self.rows


def _visible(config: PretzelConfig, tokens, slot, guided: bool):
    """(R, Q) keys the new positions offer: all for conditional rows; no text for unconditional ones."""
    if not guided:
        return jnp.ones(tokens.shape, bool)
    half = tokens.shape[0] // 2
    text = text_positions(config, tokens[half:], slot[half:], jnp.ones_like(tokens[half:]))
    return jnp.concatenate([jnp.ones_like(text), ~text], axis=0)


def _feed(config, params, vlm_params, state: State, tokens, u, slot, positions):
    """Q new positions (R, Q …) into both caches → ``(state after them, every new position's deep head
    (R, Q, 2D))``."""
    index = state.caches.index
    key_mask = jax.lax.dynamic_update_slice(state.key_mask, _visible(config, tokens, slot, state.guided), (0, index))
    out = step(config, params, vlm_params, state.caches, tokens, u, slot, positions, key_mask)
    new = state.replace(caches=out.caches, key_mask=key_mask, head=out.head[:, -1], y_vlm=out.y_vlm[:, -1],
                        y_deep=out.y_deep[:, -1])
    return new, out.head


@functools.partial(jax.jit, static_argnames=("config", "rows", "length", "guided"))
def _prefill(config, params, vlm_params, latent_vars, tokens, slot, image_index, positions, images, latents, *,
             rows: int, length: int, guided: bool):
    model = Pretzel(config)
    n, d = config.num_slots, config.latent_dim
    t = tokens.shape[0]
    u_tok = jnp.zeros((t, d), jnp.float32)
    if latents is None and images.shape[0]:
        latents = config.latent.encode(latent_vars, images).reshape(images.shape[0], n, d)
    if latents is not None and latents.shape[0]:
        x = latents.astype(jnp.float32)
        u, _ = model.apply(_variables(params, vlm_params), x, method=Pretzel.shallow_forward)
        rank = (jnp.cumsum(slot.astype(jnp.int32)) - 1) % n
        u_tok = jnp.where(slot[:, None], u[jnp.maximum(image_index, 0), rank], 0.0)
    tile = lambda a: jnp.broadcast_to(a[None], (rows,) + a.shape)  # noqa: E731
    empty = State(caches=create_caches(config, rows, length), key_mask=jnp.zeros((rows, length), bool),
                  position=jnp.zeros((), jnp.int32), head=jnp.zeros((rows, 2 * d), jnp.float32),
                  y_vlm=jnp.zeros((rows, config.vlm.hidden_size)), y_deep=jnp.zeros((rows, config.flow_width)),
                  guided=guided)
    state, _ = _feed(config, params, vlm_params, empty, tile(tokens), tile(u_tok), tile(slot), tile(positions))
    return state.replace(position=jnp.max(positions) + 1)


def _rows(a, guided: bool):
    return jnp.concatenate([a, a], axis=0) if guided else a


@functools.partial(jax.jit, static_argnames=("config", "block", "max_iters"))
def _image_segment(config, params, vlm_params, state: State, eps, guidance, threshold, *, block: int, max_iters: int):
    """N slots after a written ``<|vision_start|>``, then ``<|vision_end|>``. eps (B, N, D) the noise.
    Returns ``(state, u (B, N, D), transformer passes used)``."""
    deep_cfg = config.deep_config()
    b, n, d = eps.shape
    gh, gw = config.grid
    v = config.vlm
    start = state.position
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    offsets = jnp.asarray(np.stack([np.zeros(n, int), r.ravel(), c.ravel()], axis=1), jnp.int32)  # (N, 3)
    guided = state.guided
    rows = 2 * b if guided else b

    def solve_chunk(k, carry):
        state, u_all, passes = carry
        first = k * block
        eps_chunk = jax.lax.dynamic_slice_in_dim(eps, first, block, axis=1)
        pos = jnp.broadcast_to(start + jax.lax.dynamic_slice_in_dim(offsets, first, block, axis=0), (rows, block, 3))
        tokens = jnp.full((rows, block), v.image_token_id, jnp.int32)
        slot = jnp.ones((rows, block), bool)

        def draw(heads, noise):  # u = μ + σ·ε from head outputs (R, Q, 2D), guided on [cond; uncond] rows
            a, shift = split_affine(deep_cfg, heads)
            if guided:
                mu, sigma = guided_affine(deep_cfg, a, shift, guidance)
                mu, sigma = mu[:b], sigma[:b]
            else:
                mu, (sigma, _) = shift, sigma_from_preact(deep_cfg, a)
            return mu + sigma * noise

        def body(carry):  # one pass over the block from the chunk's start state (= a rewound cache)
            _, guess, i, _ = carry
            new_state, heads_all = _feed(config, params, vlm_params, state, tokens, _rows(guess, guided), slot, pos)
            new = draw(jnp.concatenate([state.head[:, None], heads_all[:, :-1]], axis=1), eps_chunk)
            change = jnp.sum(jnp.square(new - guess))
            size = jnp.sum(jnp.square(new))
            done = (change / jnp.maximum(size, jnp.finfo(jnp.float32).tiny) < threshold) | (i + 1 >= max_iters)
            return new_state, new, i + 1, done

        # the block's first slot depends only on the cached context: exact before the first pass, so a
        # block of 1 (sequential sampling) needs one pass, and the cache holds the keys of exact values
        # once a pass changes nothing (threshold 0); otherwise those of the last pass's inputs (ml-starflow)
        first_value = draw(state.head[:, None], eps_chunk[:, :1])
        init = (state, jnp.concatenate([first_value, eps_chunk[:, 1:]], axis=1), jnp.zeros((), jnp.int32),
                jnp.zeros((), bool))
        new_state, new, used, _ = jax.lax.while_loop(lambda s: ~s[3], body, init)
        u_all = jax.lax.dynamic_update_slice_in_dim(u_all, new, first, axis=1)
        return new_state, u_all, passes + used

    state = state.replace(position=start)
    state, u, passes = jax.lax.fori_loop(0, n // block, solve_chunk,
                                         (state, jnp.zeros_like(eps), jnp.zeros((), jnp.int32)))
    end = start + max(gh, gw)
    tokens = jnp.full((rows, 1), v.vision_end_token_id, jnp.int32)
    state, _ = _feed(config, params, vlm_params, state, tokens, jnp.zeros((rows, 1, d)), jnp.zeros((rows, 1), bool),
                     jnp.full((rows, 1, 3), end, jnp.int32))
    return state.replace(position=end + 1), u, passes


@functools.partial(jax.jit, static_argnames=("config", "max_tokens", "greedy", "allow_images"))
def _text_segment(config, params, vlm_params, state: State, rng, temperature, top_p, stop_tokens, pad_id, budget,
                  logit_bias, *, max_tokens: int, greedy: bool, allow_images: bool):
    """Samples up to ``budget`` (≤ max_tokens) tokens per row, feeding each into both caches; stops a row
    at a stop token (or ``<|vision_start|>`` when ``allow_images``). Returns ``(state, ids (B, max_tokens),
    tokens sampled)``; finished rows receive ``pad_id``. logit_bias (vocab,) is added to the logits."""
    v = config.vlm
    guided = state.guided
    rows, b = state.rows, state.num_samples
    banned = [v.image_token_id, v.vision_end_token_id] + ([] if allow_images else [v.vision_start_token_id])

    def body(carry):
        k, state, finished, ids = carry
        logits = lm_logits(config, params, vlm_params, state.y_vlm[:b, None], state.y_deep[:b, None])[:, 0]
        logits = (logits + logit_bias).at[:, jnp.asarray(banned)].set(-jnp.inf)
        token = sample_logits(logits, jax.random.fold_in(rng, k), temperature, top_p, greedy)
        token = jnp.where(finished, pad_id, token)
        ids = ids.at[:, k].set(token)
        finished = finished | jnp.isin(token, stop_tokens)
        if allow_images:
            finished = finished | (token == v.vision_start_token_id)
        tokens = _rows(token[:, None], guided)
        pos = jnp.broadcast_to(state.position, (rows, 1, 3))
        state, _ = _feed(config, params, vlm_params, state, tokens, jnp.zeros((rows, 1, config.latent_dim)),
                         jnp.zeros((rows, 1), bool), pos)
        return k + 1, state.replace(position=state.position + 1), finished, ids

    carry = (jnp.zeros((), jnp.int32), state, jnp.zeros((b,), bool), jnp.full((b, max_tokens), pad_id, jnp.int32))
    k, state, _, ids = jax.lax.while_loop(lambda c: (c[0] < budget) & ~jnp.all(c[2]), body, carry)
    return state, ids, k


# ---- the segment API: what the modes below (and a caller composing its own loop) are made of ------
def prefill(config: PretzelConfig, params, vlm_params, latent_vars, prompt: dict, *, length: int,
            num_samples: int = 1, guided: bool = False, latents=None) -> State:
    """One prompt document (``layout.layout_document``'s dict: tokens (T,), positions (T, 3), slot (T,),
    image_index (T,), images (K, H, W, C)) fed into fresh caches of ``length`` positions for
    ``num_samples`` rows (doubled with ``guided``: the second half hides the prompt's text from
    attention). The prompt's images enter as context: latent space → f_S → u at their slots, or
    ``latents`` (K, N, D) instead of encoding the images (e.g. generated ones: no pixel round trip).
    Jitted per (config, T, K, rows, length). Returns the ``State`` after the prompt (its ``position``
    is the next text position)."""
    _check_prompt(config, prompt, 0, length)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: expected a positive int")
    k = len(prompt["images"])
    if latents is not None:
        want = (k, config.num_slots, config.latent_dim)
        if tuple(latents.shape) != want:
            raise ValueError(f"latents have shape {tuple(latents.shape)}: expected {want} (one (N, D) per prompt "
                             f"image)")
        latents = jnp.asarray(latents, jnp.float32)
    rows = 2 * int(num_samples) if guided else int(num_samples)
    return _prefill(config, params, vlm_params, latent_vars, jnp.asarray(prompt["tokens"]),
                    jnp.asarray(prompt["slot"]), jnp.asarray(prompt["image_index"]),
                    jnp.asarray(prompt["positions"]), jnp.asarray(prompt["images"]), latents, rows=rows,
                    length=length, guided=bool(guided))


@functools.partial(jax.jit, static_argnames=("config",))
def feed_token(config: PretzelConfig, params, vlm_params, state: State, token) -> State:
    """One text token (an int scalar, the same for every row; e.g. ``<|vision_start|>`` before an image
    segment) into both caches at the next text position. Jitted. Returns the ``State`` after it."""
    rows = state.rows
    tokens = jnp.full((rows, 1), token, jnp.int32)
    pos = jnp.broadcast_to(state.position, (rows, 1, 3))
    state, _ = _feed(config, params, vlm_params, state, tokens, jnp.zeros((rows, 1, config.latent_dim)),
                     jnp.zeros((rows, 1), bool), pos)
    return state.replace(position=state.position + 1)


def _room(state: State, needed: int, what: str) -> None:
    """ValueError when the caches cannot take ``needed`` more positions (skipped inside a trace)."""
    index = state.caches.index
    if isinstance(index, jax.core.Tracer):
        return
    left = state.caches.length - int(index)
    if needed > left:
        raise ValueError(f"{what} needs {needed} more positions but the caches of length {state.caches.length} "
                         f"hold only {left} more")


def image_segment(config: PretzelConfig, params, vlm_params, state: State, eps, guidance=0.0, *,
                  jacobi=None) -> tuple[State, jax.Array, jax.Array]:
    """One image after a ``<|vision_start|>`` already in the caches (the prompt's last token, or
    ``feed_token``): N image steps u_n = μ + σ·ε_n from the deep head (Gaussian guidance of weight
    ``guidance`` on a guided state), each u_n fed at its slot into both streams, then
    ``<|vision_end|>``. eps (B, N, D): the noise, used as given (a caller sampling at an image
    temperature T passes T·ε, as ``text_to_image`` / ``interleaved`` do); jacobi: None (sequential) or
    ``flow.JacobiOptions`` /
    dict(block_size dividing N, threshold, max_iters). Jitted per (config, shapes, Jacobi block and
    iteration cap); callable inside a jit. Returns ``(state after <|vision_end|>, u (B, N, D) (the
    shallow-flow outputs: ``invert_shallow`` gives the latents), deep-stream passes used ())``."""
    n, d = config.num_slots, config.latent_dim
    want = (state.num_samples, n, d)
    if tuple(eps.shape) != want:
        raise ValueError(f"eps has shape {tuple(eps.shape)}: expected {want} (the state's sample rows, N slots, "
                         f"D)")
    if isinstance(guidance, (int, float)) and guidance != 0 and not state.guided:
        raise ValueError(f"guidance={guidance}: the state was prefilled without guided=True (no unconditional rows)")
    block, max_iters, threshold = _jacobi(jacobi, n)
    _room(state, n + 1, "an image segment")
    return _image_segment(config, params, vlm_params, state, eps, jnp.asarray(guidance, jnp.float32),
                          jnp.asarray(threshold, jnp.float32), block=block, max_iters=max_iters)


def text_segment(config: PretzelConfig, params, vlm_params, state: State, rng, *, max_tokens: int, budget=None,
                 temperature: float = 0.0, top_p: float = 1.0, stop_tokens=None, logit_bias=None,
                 allow_images: bool = False) -> tuple[State, jax.Array, jax.Array]:
    """Samples text from LMHead(y_vlm + W_D·y_D) at the last position, feeding each token into both
    caches, for up to ``budget`` tokens (an int or int scalar ≤ ``max_tokens``, default ``max_tokens``;
    a traced budget does not recompile). A row stops at a stop token (default the VLM's EOS ids) or,
    with ``allow_images``, at ``<|vision_start|>`` (then run ``image_segment``). temperature 0 is greedy;
    top_p nucleus; logit_bias (vocab,) is added to the logits. Jitted per (config, shapes, max_tokens,
    greedy, allow_images). Returns ``(state, ids (B, max_tokens) int32 — finished rows padded with the
    pad id —, tokens sampled () — the loop's steps, the longest row)``."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r}: expected a positive int")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} (>= 0), top_p={top_p} (in (0, 1])")
    budget = max_tokens if budget is None else budget
    if isinstance(budget, (int, np.integer)):
        if not 0 <= budget <= max_tokens:
            raise ValueError(f"budget={budget}: expected 0..max_tokens={max_tokens}")
        _room(state, int(budget), f"a text segment of {int(budget)} tokens")
    stops, pad = _stops(config, stop_tokens)
    return _text_segment(config, params, vlm_params, state, rng, jnp.float32(max(temperature, 1e-6)),
                         jnp.float32(top_p), stops, pad, jnp.asarray(budget, jnp.int32), _bias(config, logit_bias),
                         max_tokens=int(max_tokens), greedy=temperature == 0, allow_images=bool(allow_images))


# ---- host side ------------------------------------------------------------------------------------
def _shallow_variables(config: PretzelConfig, params) -> dict:
    return {"params": {f"blocks_{k}": params[f"shallow_{k}"] for k in range(config.shallow_blocks)},
            "prior": {"var": jnp.ones((config.num_slots, config.latent_dim), jnp.float32)}}


def invert_shallow(config: PretzelConfig, params, u) -> jax.Array:
    """x = f_S⁻¹(u): (B, N, D) shallow-flow outputs → latents (B, N, D) (unconditional, no guidance)."""
    x, _ = flow.sample_tokens(config.shallow_config(), _shallow_variables(config, params), jnp.asarray(u))
    return x


@functools.partial(jax.jit, static_argnums=0)
def _score_step(config, params, vlm_params, batch, latents, sigma):
    from starflow2_jax.pretzel.model import apply_model, image_nll

    def nll(x):
        return jnp.sum(image_nll(config, apply_model(config, params, vlm_params, batch, x)))

    return latents - jnp.square(sigma) * jax.grad(nll)(latents)


def _record(doc: dict) -> dict:
    """A layout dict → the growing transcript (lists of tokens, positions, slot, u per position)."""
    t = len(doc["tokens"])
    return dict(tokens=list(doc["tokens"].tolist()), positions=[tuple(p) for p in doc["positions"].tolist()],
                slot=list(doc["slot"].tolist()), u=[None] * t)


def _check_prompt(config: PretzelConfig, prompt: dict, extra: int, length: int) -> None:
    needed = len(prompt["tokens"]) + extra
    if needed > length:
        raise ValueError(f"the prompt of {len(prompt['tokens'])} tokens plus {extra} generated positions does not "
                         f"fit the caches of length {length}")
    if len(prompt["images"]) and config.max_images == 0:
        raise ValueError("the prompt holds images but the config expects none (max_images=0)")


def _jacobi(jacobi, n: int):
    if jacobi is None:
        return 1, 1, 0.0
    block, threshold, max_iters = (jacobi.block_size, jacobi.threshold, jacobi.max_iters) if hasattr(
        jacobi, "block_size") else (jacobi["block_size"], jacobi.get("threshold", 1e-3), jacobi.get("max_iters", 32))
    if block < 1 or n % block or max_iters < 1 or threshold < 0:
        raise ValueError(f"jacobi block_size={block} must divide the {n} slots, max_iters={max_iters} >= 1, "
                         f"threshold={threshold} >= 0")
    return int(block), int(max_iters), float(threshold)


def check_image_temperature(value) -> float:
    """T of the image noise ε ~ N(0, T²·I) as a float; ValueError unless a finite real number > 0.

    T = 0 is refused: it is the mode path u_n = μ_n, one and the same image in every row of a prompt (the
    ``num_samples`` rows and guidance's twin rows carry no noise at all), and not even the mode of the
    image's density (the steps' σ and the shallow flows' Jacobian are left out); a small T > 0 comes as
    close to the mode as wanted and stays a sample."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or \
            not np.isfinite(value) or value <= 0:
        raise ValueError(f"image_temperature={value!r}: expected a finite number > 0 (the image noise is "
                         f"ε ~ N(0, T²·I); 1: the model's distribution)")
    return float(value)


def _append_vision_start(config: PretzelConfig, prompt: dict) -> dict:
    p = dict(prompt)
    nxt = int(prompt["positions"].max()) + 1 if len(prompt["tokens"]) else 0
    p["tokens"] = np.append(prompt["tokens"], config.vlm.vision_start_token_id).astype(np.int32)
    p["positions"] = np.concatenate([prompt["positions"], np.full((1, 3), nxt, np.int32)]).astype(np.int32)
    p["slot"] = np.append(prompt["slot"], False)
    p["image_index"] = np.append(prompt["image_index"], -1).astype(np.int32)
    return p


def text_to_image(config: PretzelConfig, params, vlm_params, latent_vars, prompt: dict, *, rng, num_samples: int = 1,
                  guidance: float = 0.0, jacobi=None, denoise: bool = False, decode: bool = True,
                  length: int | None = None, image_temperature: float = 1.0) -> dict:
    """Images for one prompt document (``layout.layout_document``; ``<|vision_start|>`` is appended).

    guidance: STARFlow's Gaussian guidance weight on the deep stream (0: off; else a doubled batch whose
    unconditional half has the prompt's text masked out). image_temperature: T > 0, every image step's
    noise is T·ε with ε ~ N(0, I) drawn from ``rng`` (Glow's temperature; 1: the model's distribution, < 1:
    closer to the mode, less varied). jacobi: None (sequential) or
    ``flow.JacobiOptions`` / dict(block_size dividing N, threshold, max_iters). denoise: one score step
    with σ = ``config.latent_noise``. Returns ``dict(u (B, N, D), latents (B, N, D), images (B, H, W, C)
    or None, passes (deep-stream passes), state (the final ``State``), sequence (the final document))``.
    """
    n = config.num_slots
    prompt = _append_vision_start(config, prompt)
    length = length or len(prompt["tokens"]) + n + 1
    _check_prompt(config, prompt, n + 1, length)
    _jacobi(jacobi, n)  # bad options fail before any work
    temperature = check_image_temperature(image_temperature)
    state = prefill(config, params, vlm_params, latent_vars, prompt, length=length, num_samples=num_samples,
                    guided=guidance != 0)
    eps = temperature * jax.random.normal(rng, (num_samples, n, config.latent_dim), jnp.float32)
    state, u, passes = image_segment(config, params, vlm_params, state, eps, guidance, jacobi=jacobi)
    x = invert_shallow(config, params, u)
    sequence = _record(prompt)
    _append_image(config, sequence, np.asarray(u[0]), int(prompt["positions"].max()) + 1)
    if denoise:
        x = _denoise(config, params, vlm_params, latent_vars, prompt, x)
    images = config.latent.decode(latent_vars, x) if decode else None
    return dict(u=u, latents=x, images=images, passes=int(passes), state=state, sequence=_finish(sequence))


def _append_image(config: PretzelConfig, sequence: dict, u, start: int) -> int:
    """Appends N slots (u (N, D)) at 3D positions from ``start`` and ``<|vision_end|>``; returns the next
    text position."""
    gh, gw = config.grid
    for i in range(config.num_slots):
        sequence["tokens"].append(config.vlm.image_token_id)
        sequence["positions"].append((start, start + i // gw, start + i % gw))
        sequence["slot"].append(True)
        sequence["u"].append(np.asarray(u[i]))
    end = start + max(gh, gw)
    sequence["tokens"].append(config.vlm.vision_end_token_id)
    sequence["positions"].append((end, end, end))
    sequence["slot"].append(False)
    sequence["u"].append(None)
    return end + 1


def _finish(sequence: dict) -> dict:
    """The transcript as arrays: tokens (T,), positions (T, 3), slot (T,), u (T, D) (zeros off slots;
    prompt images' slots too — their u comes from the prompt's images)."""
    d = next((x.shape[-1] for x in sequence["u"] if x is not None), 0)
    u = np.stack([np.zeros(d, np.float32) if x is None else np.asarray(x, np.float32) for x in sequence["u"]]) \
        if d else np.zeros((len(sequence["tokens"]), 0), np.float32)
    return dict(tokens=np.asarray(sequence["tokens"], np.int32), positions=np.asarray(sequence["positions"], np.int32),
                slot=np.asarray(sequence["slot"], bool), u=u)


def _denoise(config, params, vlm_params, latent_vars, prompt, x):
    """One score step x + σ²·∇ₓ log p(x | prompt) on the generated latents x (B, N, D) (Tweedie)."""
    from starflow2_jax.pretzel.model import encode_images
    if config.latent_noise <= 0:
        raise ValueError("denoise=True needs config.latent_noise > 0 (the σ of the training noise)")
    n, b = config.num_slots, x.shape[0]
    seq = _record(prompt)
    _append_image(config, seq, np.zeros((n, config.latent_dim)), int(prompt["positions"].max()) + 1)
    seq = _finish(seq)
    m = len(prompt["images"]) + 1
    index = np.full(len(seq["tokens"]), -1, np.int32)
    index[: len(prompt["image_index"])] = prompt["image_index"]
    index[len(prompt["tokens"]):len(prompt["tokens"]) + n] = m - 1
    batch = dict(tokens=seq["tokens"], positions=seq["positions"], slot=seq["slot"], image_index=index,
                 segment_ids=np.ones(len(seq["tokens"]), np.int32), image_valid=np.ones(m, bool))
    batch = {k: jnp.broadcast_to(jnp.asarray(v), (b,) + v.shape) for k, v in batch.items()}
    latents = x[:, None]
    if len(prompt["images"]):
        context = encode_images(config, latent_vars, jnp.asarray(prompt["images"])[None])
        latents = jnp.concatenate([jnp.broadcast_to(context, (b,) + context.shape[1:]), latents], axis=1)
    return _score_step(config, params, vlm_params, batch, latents, jnp.float32(config.latent_noise))[:, -1]


def _bias(config: PretzelConfig, logit_bias) -> jax.Array:
    if logit_bias is None:
        return jnp.zeros((config.vlm.vocab_size,), jnp.float32)
    bias = jnp.asarray(logit_bias, jnp.float32)
    if bias.shape != (config.vlm.vocab_size,):
        raise ValueError(f"logit_bias has shape {bias.shape}: expected ({config.vlm.vocab_size},)")
    return bias


def _stops(config: PretzelConfig, stop_tokens):
    stops = tuple(config.vlm.eos_token_ids) if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    pad = config.vlm.pad_token_id if config.vlm.pad_token_id is not None else (stops[0] if stops else 0)
    return jnp.asarray(stops or (-1,), jnp.int32), jnp.int32(pad)


def image_to_text(config: PretzelConfig, params, vlm_params, latent_vars, prompt: dict, *, rng=None,
                  num_samples: int = 1, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                  stop_tokens=None, length: int | None = None, logit_bias=None) -> dict:
    """Text after one prompt document (its images enter as context: latent space → f_S → u into both
    streams, no vision tower). temperature 0 is greedy. Returns ``dict(ids (B, max_new_tokens) int32
    (padded after the stop token), lengths (B,), state)``."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} (>= 1), temperature={temperature} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    length = length or len(prompt["tokens"]) + max_new_tokens
    _check_prompt(config, prompt, max_new_tokens, length)
    state = prefill(config, params, vlm_params, latent_vars, prompt, length=length, num_samples=num_samples)
    stops, _ = _stops(config, stop_tokens)
    state, ids, _ = text_segment(config, params, vlm_params, state, jax.random.key(0) if rng is None else rng,
                                 max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 stop_tokens=stop_tokens, logit_bias=logit_bias)
    ids = np.asarray(ids)
    stopped = np.isin(ids, np.asarray(stops))
    lengths = np.where(stopped.any(axis=1), stopped.argmax(axis=1) + 1, max_new_tokens)
    return dict(ids=ids, lengths=lengths, state=state)


def interleaved(config: PretzelConfig, params, vlm_params, latent_vars, prompt: dict, *, rng, length: int,
                max_new_tokens: int = 64, max_images: int = 4, guidance: float = 0.0, jacobi=None,
                temperature: float = 0.0, top_p: float = 1.0, stop_tokens=None, decode: bool = True,
                segment_tokens: int = 32, logit_bias=None, image_temperature: float = 1.0) -> dict:
    """One row of interleaved text and images after a prompt document.

    Text segments sample up to ``segment_tokens`` tokens (compiled once) until a stop token or
    ``<|vision_start|>``; then an image segment runs N guided image steps (``guidance``, ``jacobi`` as
    for ``text_to_image``) and ``<|vision_end|>``; then text again, until a stop token, ``max_new_tokens``
    text tokens, ``max_images`` images or the caches' ``length``. temperature / top_p: the text's;
    image_temperature: the images' (T > 0: each image step's noise is T·ε, as for ``text_to_image``).
    logit_bias: (vocab,) added to every text logit (e.g. to make images more or less likely). Returns
    ``dict(sequence (the final document: tokens, positions, slot, u), latents [(N, D) per image], images
    [(H, W, C)] or None, state)``."""
    n = config.num_slots
    _check_prompt(config, prompt, 1, length)
    _jacobi(jacobi, n)  # bad options fail before any work
    image_temperature = check_image_temperature(image_temperature)
    state = prefill(config, params, vlm_params, latent_vars, prompt, length=length, guided=guidance != 0)
    stops, _ = _stops(config, stop_tokens)
    sequence = _record(prompt)
    latents, images, written = [], [], 0
    key = 0
    while written < max_new_tokens:
        room = length - int(state.caches.index) - (n + 2 if len(latents) < max_images else 0)
        budget = min(segment_tokens, max_new_tokens - written, room)
        if budget <= 0:
            break
        start = int(state.position)
        state, ids, count = text_segment(
            config, params, vlm_params, state, jax.random.fold_in(rng, key), max_tokens=segment_tokens,
            budget=jnp.int32(budget), temperature=temperature, top_p=top_p, stop_tokens=stop_tokens,
            logit_bias=logit_bias, allow_images=len(latents) < max_images)
        key += 1
        new = np.asarray(ids)[0, :int(count)].tolist()
        written += len(new)
        for i, t in enumerate(new):
            sequence["tokens"].append(t)
            sequence["positions"].append((start + i,) * 3)
            sequence["slot"].append(False)
            sequence["u"].append(None)
        if not new or new[-1] != config.vlm.vision_start_token_id:
            if new and new[-1] in np.asarray(stops).tolist():
                break
            continue
        eps = image_temperature * jax.random.normal(jax.random.fold_in(rng, 10_000 + key), (1, n, config.latent_dim),
                                                    jnp.float32)
        slot_start = int(state.position)
        state, u, _ = image_segment(config, params, vlm_params, state, eps, guidance, jacobi=jacobi)
        _append_image(config, sequence, np.asarray(u[0]), slot_start)
        x = invert_shallow(config, params, u)
        latents.append(np.asarray(x[0]))
        if decode:
            images.append(np.asarray(config.latent.decode(latent_vars, x)[0]))
    return dict(sequence=_finish(sequence), latents=latents, images=images if decode else None, state=state)


# ---- the no-re-encoding check ----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "length"))
def _teacher_forced_caches(config, params, vlm_params, tokens, u, slot, positions, key_mask, *, length: int) -> Caches:
    return step(config, params, vlm_params, create_caches(config, 1, length), tokens, u, slot, positions,
                key_mask).caches


def cache_difference(config: PretzelConfig, params, vlm_params, sequence: dict, state: State) -> float:
    """The largest absolute difference between the caches generation left (``state``, after writing
    ``sequence``) and those of ONE teacher-forced pass over ``sequence`` from empty caches: ≈ 0 (float
    rounding) when nothing was re-encoded (SPEC §5.3).

    sequence: the final document of ``text_to_image`` / ``interleaved`` (tokens (T,), positions (T, 3),
    slot (T,), u (T, D)); its ``u`` must hold every slot's value, so the prompt may hold no images
    (their u is not recorded). The first sample row is compared with the conditional pass over every
    position; with guidance its unconditional twin (row B) with a pass whose text is masked out of
    attention, at the keys some query can read (its text positions' own entries are never read).
    Returns the difference as a float; ValueError when ``state`` has not written exactly ``sequence``.
    """
    tokens = np.asarray(sequence["tokens"])
    t, length = len(tokens), state.caches.length
    if int(state.caches.index) != t:
        raise ValueError(f"the caches hold {int(state.caches.index)} positions but the sequence has {t}: expected the "
                         f"state generation returned with this sequence")
    u = np.asarray(sequence["u"], np.float32)
    if u.shape != (t, config.latent_dim):
        if u.shape != (t, 0) or np.any(sequence["slot"]):  # (T, 0): a document without slots (_finish)
            raise ValueError(f"sequence u has shape {u.shape}: expected ({t}, {config.latent_dim})")
        u = np.zeros((t, config.latent_dim), np.float32)
    seq = {k: jnp.asarray(np.asarray(sequence[k]))[None] for k in ("tokens", "slot", "positions")}
    seq["u"] = jnp.asarray(u)[None]
    rows = [(0, None, np.arange(t))]
    if state.guided:
        text = np.asarray(text_positions(config, seq["tokens"], seq["slot"], jnp.ones((1, t), jnp.int32)))[0]
        key_mask = np.pad(~text, (0, length - t))
        rows.append((state.num_samples, jnp.asarray(key_mask[None]), np.flatnonzero(~text)))
    worst = 0.0
    for row, key_mask, read in rows:
        want = _teacher_forced_caches(config, params, vlm_params, seq["tokens"], seq["u"], seq["slot"],
                                      seq["positions"], key_mask, length=length)
        for got, ref in zip(jax.tree_util.tree_leaves(state.caches), jax.tree_util.tree_leaves(want)):
            if np.ndim(got):  # (layers, rows, S, heads, dim); the index is a scalar
                got = np.asarray(got[:, row], np.float32)[:, read]
                ref = np.asarray(ref[:, 0], np.float32)[:, read]
                worst = max(worst, float(np.max(np.abs(got - ref))) if got.size else 0.0)
    return worst
