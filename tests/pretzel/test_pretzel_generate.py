"""Generation with shared caches against teacher forcing (SPEC §5.3 invariants 3 and 5).

Oracles: one teacher-forced pass (``step`` over the whole final sequence, from empty caches) for the
caches and for greedy text; the model's forward likelihood pass for guidance 0 (it must map the
generated image back to the drawn noise); STARFlow's product-of-Gaussians formula written out here
for guidance; sequential sampling for Jacobi at threshold 0; the noise recovered from the teacher-forced
heads, (u − μ)/σ, for the image temperature (T·ε).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretzel_fixtures import active_params, batch_of, image, jnp_batch, lm_logits, tiny, vlm_params, words
from starflow2_jax.pretzel import generate as gen
from starflow2_jax.pretzel import layout
from starflow2_jax.pretzel import model as pmodel
from starflow2_jax.pretzel import step as pstep

_step = jax.jit(pstep.step, static_argnums=0)


def _teacher_forced(cfg, params, sequence, length, key_mask=None):
    """One pass over the final sequence (batch of one) from empty caches → StepOutput."""
    caches = pmodel.create_caches(cfg, 1, length)
    seq = {k: jnp.asarray(v)[None] for k, v in sequence.items()}
    return _step(cfg, params, vlm_params(), caches, seq["tokens"], seq["u"], seq["slot"], seq["positions"], key_mask)


def _prompt(seed=0, n=5):
    return layout.layout_document(tiny(), [words(np.random.default_rng(seed), n)])


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_interleaved_caches_equal_teacher_forcing(guidance):
    """Text, two generated images and text: both streams' caches (both guidance halves) equal one
    teacher-forced pass over the final sequence — no re-encoding."""
    cfg = tiny()
    params = active_params()
    bias = np.zeros(cfg.vlm.vocab_size, np.float32)
    bias[cfg.vlm.vision_start_token_id] = 5.0  # with seed 1: text, image, text, image, text
    length = 48
    res = gen.interleaved(cfg, params, vlm_params(), {}, _prompt(), rng=jax.random.key(1), length=length,
                          max_new_tokens=16, max_images=2, guidance=guidance, temperature=1.0, logit_bias=bias,
                          segment_tokens=8, decode=False)
    seq = res["sequence"]
    starts = np.flatnonzero(seq["tokens"] == cfg.vlm.vision_start_token_id)
    assert len(res["latents"]) == 2 and len(starts) == 2
    if not guidance:
        assert starts[1] > starts[0] + cfg.num_slots + 2  # text between the images
    assert not seq["slot"][-1] and seq["tokens"][-1] != cfg.vlm.vision_end_token_id  # text after the images
    t = len(seq["tokens"])
    state = res["state"]
    assert int(state.caches.index) == t
    # gen.cache_difference: one teacher-forced pass (the conditional row; with guidance also the
    # unconditional half, its text hidden from attention: its text positions' own keys/values are never
    # read — masked for every query, whose queries see no key and hold softmax-of-nothing garbage —, so
    # only the entries some query can read are compared)
    assert gen.cache_difference(cfg, params, vlm_params(), seq, state) <= 1e-4
    # the check sees a re-encoding: a slot's u changed after generation → its keys differ
    changed = dict(seq, u=seq["u"].copy())
    changed["u"][starts[1] + 1] += 0.5
    assert gen.cache_difference(cfg, params, vlm_params(), changed, state) > 1e-2
    with pytest.raises(ValueError, match=f"the caches hold {t} positions but the sequence has {t - 1}"):
        gen.cache_difference(cfg, params, vlm_params(), {k: v[:-1] for k, v in seq.items()}, state)


def test_guidance_zero_is_deterministic_and_inverts_the_forward():
    """Guidance 0, fixed seed: the same images twice, and the model's likelihood pass maps them back to
    the drawn noise (sampling is the model's inverse)."""
    cfg = tiny()
    params = active_params()
    prompt = _prompt(1)
    rng = jax.random.key(4)
    a = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2)
    b = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2)
    np.testing.assert_array_equal(np.asarray(a["images"]), np.asarray(b["images"]))
    eps = jax.random.normal(rng, (2, cfg.num_slots, cfg.latent_dim), jnp.float32)
    doc = layout.layout_document(cfg, [prompt["tokens"], np.zeros((8, 8, 1), np.float32)])
    batch = jnp_batch(batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=1))
    batch = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
    out = jax.jit(functools.partial(pmodel.apply_model, cfg))(params, vlm_params(), batch, a["latents"][:, None])
    np.testing.assert_allclose(out.z[:, 0], eps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.u[:, 0], a["u"], atol=1e-4, rtol=0)


def test_guidance_follows_the_starflow_gaussian_formula():
    cfg = tiny()
    params = active_params()
    prompt = _prompt(2)
    w, rng = 2.0, jax.random.key(5)
    res = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=1, guidance=w)
    seq = res["sequence"]
    t = len(seq["tokens"])
    text = np.asarray(gen.text_positions(cfg, seq["tokens"][None], seq["slot"][None], np.ones((1, t), int)))
    cond = _teacher_forced(cfg, params, seq, t).head[0]
    uncond = _teacher_forced(cfg, params, seq, t, jnp.asarray(~text)).head[0]
    slots = np.flatnonzero(seq["slot"])
    d = cfg.latent_dim
    softplus = lambda a: np.log1p(np.exp(a + np.log(np.e - 1)))  # noqa: E731
    sc, mc = softplus(np.asarray(cond[slots - 1, :d], np.float64)), np.asarray(cond[slots - 1, d:], np.float64)
    su, mu_u = softplus(np.asarray(uncond[slots - 1, :d], np.float64)), np.asarray(uncond[slots - 1, d:], np.float64)
    s = np.minimum(sc / su, 1.0) ** 2
    sigma = sc / np.sqrt(1 + w - w * s)
    mu = ((1 + w) * mc - w * s * mu_u) / (1 + w - w * s)
    eps = np.asarray(jax.random.normal(rng, (1, cfg.num_slots, d), jnp.float32))[0]
    np.testing.assert_allclose(res["u"][0], mu + sigma * eps, atol=1e-4, rtol=0)
    plain = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=1)
    assert float(jnp.max(jnp.abs(plain["u"] - res["u"]))) > 1e-3


def _drawn_noise(cfg, params, seq, w):
    """ε = (u − μ)/σ at every slot of a final document (row 0 of its generation), μ and σ from the
    teacher-forced deep heads at the position before each slot: the conditional pass alone (w = 0), or
    with the pass whose text is masked out, combined by STARFlow's Gaussian guidance formula written out
    here. Returns (slots, D) float64."""
    t, d = len(seq["tokens"]), cfg.latent_dim
    slots = np.flatnonzero(seq["slot"])
    softplus = lambda a: np.log1p(np.exp(a + np.log(np.e - 1)))  # noqa: E731

    def affine(key_mask=None):
        head = np.asarray(_teacher_forced(cfg, params, seq, t, key_mask).head[0], np.float64)[slots - 1]
        return softplus(head[:, :d]), head[:, d:]

    sigma, mu = affine()
    if w:
        text = np.asarray(gen.text_positions(cfg, seq["tokens"][None], seq["slot"][None], np.ones((1, t), int)))
        su, mu_u = affine(jnp.asarray(~text))
        s = np.minimum(sigma / su, 1.0) ** 2
        sigma, mu = sigma / np.sqrt(1 + w - w * s), ((1 + w) * mu - w * s * mu_u) / (1 + w - w * s)
    return (np.asarray(seq["u"], np.float64)[slots] - mu) / sigma


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_text_to_image_temperature_scales_the_drawn_noise(guidance):
    """image_temperature T: the noise each row's image carries, recovered from the teacher-forced heads
    over its final document, is T·ε with ε ~ N(0, I) the draw of ``rng`` (both sample rows; with guidance
    the guided μ and σ)."""
    cfg = tiny()
    params = active_params()
    prompt = _prompt(5)
    rng, temperature = jax.random.key(9), 0.4
    res = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2, guidance=guidance,
                            image_temperature=temperature, decode=False)
    eps = np.asarray(jax.random.normal(rng, (2, cfg.num_slots, cfg.latent_dim), jnp.float32))
    for row in range(2):
        seq = dict(res["sequence"], u=res["sequence"]["u"].copy())
        seq["u"][seq["slot"]] = np.asarray(res["u"][row])  # the document records row 0's image
        np.testing.assert_allclose(_drawn_noise(cfg, params, seq, guidance), temperature * eps[row], atol=2e-3,
                                   rtol=0)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_interleaved_temperature_scales_the_drawn_noise(guidance):
    """Two images written by the model (a large bias on <|vision_start|> opens them at the same place at
    any temperature, so both runs draw the same ε): each image's noise recovered from the teacher-forced
    heads over the final document at T is T times the noise recovered at T = 1."""
    cfg = tiny()
    params = active_params()
    bias = np.zeros(cfg.vlm.vocab_size, np.float32)
    bias[cfg.vlm.vision_start_token_id] = 1e4
    noise = {}
    for temperature in (1.0, 0.5):
        res = gen.interleaved(cfg, params, vlm_params(), {}, _prompt(6), rng=jax.random.key(2), length=48,
                              max_new_tokens=8, max_images=2, guidance=guidance, logit_bias=bias, segment_tokens=4,
                              decode=False, image_temperature=temperature)
        seq = res["sequence"]
        starts = np.flatnonzero(seq["tokens"] == cfg.vlm.vision_start_token_id)
        p = len(_prompt(6)["tokens"])
        assert starts.tolist() == [p, p + cfg.num_slots + 2] and len(res["latents"]) == 2
        noise[temperature] = _drawn_noise(cfg, params, seq, guidance)
    assert np.std(noise[1.0]) > 0.3  # a real draw
    np.testing.assert_allclose(noise[0.5], 0.5 * noise[1.0], atol=2e-3, rtol=0)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_image_temperature_is_refused_before_any_work(bad):
    """No parameters are passed (None): the check comes before anything reads them."""
    cfg = tiny()
    with pytest.raises(ValueError, match=rf"image_temperature={re.escape(repr(bad))}: expected a finite number > 0"):
        gen.text_to_image(cfg, None, None, {}, _prompt(), rng=jax.random.key(0), image_temperature=bad)
    with pytest.raises(ValueError, match=rf"image_temperature={re.escape(repr(bad))}: expected a finite number > 0"):
        gen.interleaved(cfg, None, None, {}, _prompt(), rng=jax.random.key(0), length=32, image_temperature=bad)
    assert gen.check_image_temperature(np.float32(0.25)) == 0.25 and gen.check_image_temperature(2) == 2.0


def test_jacobi_threshold_zero_equals_sequential():
    cfg = tiny()
    params = active_params()
    prompt = _prompt(3)
    rng = jax.random.key(6)
    seq = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2, guidance=1.0)
    jac = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2, guidance=1.0,
                            jacobi=dict(block_size=2, threshold=0.0, max_iters=3))
    np.testing.assert_allclose(jac["u"], seq["u"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(jac["latents"], seq["latents"], atol=1e-5, rtol=0)
    assert seq["passes"] == cfg.num_slots and jac["passes"] == 3 * cfg.num_slots // 2
    for a, b in zip(jax.tree_util.tree_leaves(jac["state"].caches), jax.tree_util.tree_leaves(seq["state"].caches)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="block_size=3 must divide the 4 slots"):
        gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, jacobi=dict(block_size=3))


def test_image_to_text_greedy_equals_teacher_forced_argmax():
    """Understanding: the prompt image enters through the latent space and f_S (no vision tower); each
    greedy token is the argmax of the teacher-forced logits over the final sequence."""
    cfg = tiny()
    params = active_params()
    rng = np.random.default_rng(7)
    prompt = layout.layout_document(cfg, [words(rng, 3), image(rng), words(rng, 2)])
    res = gen.image_to_text(cfg, params, vlm_params(), {}, prompt, max_new_tokens=5, stop_tokens=[])
    ids = res["ids"][0]
    doc = layout.layout_document(cfg, [prompt["tokens"][:3], layout.Image(prompt["images"][0]),
                                       prompt["tokens"][9:], ids.tolist()])
    batch = batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=1)
    out = pmodel.forward(cfg, params, vlm_params(), batch)
    logits = np.array(lm_logits(cfg, params, vlm_params(), out.y_vlm, out.y_deep))[0]
    v = cfg.vlm
    logits[:, [v.image_token_id, v.vision_end_token_id, v.vision_start_token_id]] = -np.inf
    p = len(prompt["tokens"])
    np.testing.assert_array_equal(ids, np.argmax(logits[p - 1:p - 1 + len(ids)], axis=-1))


def test_bad_generation_inputs():
    cfg = tiny()
    params = active_params()
    with pytest.raises(ValueError, match="does not fit the caches of length 6"):
        gen.text_to_image(cfg, params, vlm_params(), {}, _prompt(), rng=jax.random.key(0), length=6)
    with pytest.raises(ValueError, match="logit_bias has shape"):
        gen.image_to_text(cfg, params, vlm_params(), {}, _prompt(), logit_bias=np.zeros(3))
    with pytest.raises(ValueError, match="denoise=True needs config.latent_noise"):
        gen.text_to_image(cfg, params, vlm_params(), {}, _prompt(), rng=jax.random.key(0), denoise=True)


def test_score_denoising_step_matches_finite_differences():
    """denoise=True: x̂ = x − σ²·∇ₓ NLL(x | prompt); the step along random directions equals central
    differences of the model's image NLL."""
    cfg = tiny(latent_noise=0.1)
    params = active_params()
    prompt = _prompt(4)
    rng = jax.random.key(8)
    raw = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, decode=False)
    den = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, decode=False, denoise=True)
    x = np.asarray(raw["latents"], np.float64)
    assert np.max(np.abs(np.asarray(den["latents"]) - x)) > 1e-3  # a real step, not a no-op
    doc = layout.layout_document(cfg, [prompt["tokens"], np.zeros((8, 8, 1), np.float32)])
    batch = jnp_batch(batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=1))
    nll = jax.jit(lambda lat: pmodel.image_nll(cfg, pmodel.apply_model(cfg, params, vlm_params(), batch, lat))[0, 0])
    h = 3e-2
    for seed in range(2):
        v = np.random.default_rng(seed).normal(size=x.shape)
        v /= np.linalg.norm(v)
        slope = (float(nll(jnp.asarray((x + h * v)[:, None], jnp.float32)))
                 - float(nll(jnp.asarray((x - h * v)[:, None], jnp.float32)))) / (2 * h)
        step = float(np.sum((np.asarray(den["latents"], np.float64) - x) * v))
        np.testing.assert_allclose(step, -0.1**2 * slope, rtol=5e-2, atol=1e-3)


def test_public_segment_api_composes_the_modes():
    """prefill + feed_token(<|vision_start|>) + image_segment + invert_shallow, composed by hand, draws
    text_to_image's image (which prefills <|vision_start|> with the prompt: another path through the
    caches), guided and with Jacobi; text_segment continues after it; bad calls name the value."""
    cfg = tiny()
    params = active_params()
    prompt = _prompt(3)
    rng = jax.random.key(6)
    jacobi = dict(block_size=2, threshold=0.0, max_iters=8)
    want = gen.text_to_image(cfg, params, vlm_params(), {}, prompt, rng=rng, num_samples=2, guidance=1.5,
                             jacobi=jacobi, decode=False)
    length = len(prompt["tokens"]) + cfg.num_slots + 2 + 4
    state = gen.prefill(cfg, params, vlm_params(), {}, prompt, length=length, num_samples=2, guided=True)
    assert (state.rows, state.num_samples, state.guided) == (4, 2, True)
    state = gen.feed_token(cfg, params, vlm_params(), state, cfg.vlm.vision_start_token_id)
    eps = jax.random.normal(rng, (2, cfg.num_slots, cfg.latent_dim), jnp.float32)
    state, u, _ = gen.image_segment(cfg, params, vlm_params(), state, eps, 1.5, jacobi=jacobi)
    np.testing.assert_allclose(np.asarray(u), np.asarray(want["u"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(gen.invert_shallow(cfg, params, u)), np.asarray(want["latents"]),
                               atol=1e-4, rtol=0)
    assert int(state.caches.index) == len(prompt["tokens"]) + cfg.num_slots + 2
    state, ids, count = gen.text_segment(cfg, params, vlm_params(), state, rng, max_tokens=4, stop_tokens=())
    assert ids.shape == (2, 4) and int(count) == 4 and int(state.caches.index) == length
    with pytest.raises(ValueError, match=r"caches of length .* hold only 0 more"):
        gen.text_segment(cfg, params, vlm_params(), state, rng, max_tokens=1)
    plain = gen.prefill(cfg, params, vlm_params(), {}, prompt, length=length)
    with pytest.raises(ValueError, match=r"eps has shape \(2, 4, 16\): expected \(1, 4, 16\)"):
        gen.image_segment(cfg, params, vlm_params(), plain, eps)
    with pytest.raises(ValueError, match=r"guidance=2.0: the state was prefilled without guided=True"):
        gen.image_segment(cfg, params, vlm_params(), plain, eps[:1], 2.0)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 16\): expected \(0, 4, 16\)"):
        gen.prefill(cfg, params, vlm_params(), {}, prompt, length=length, latents=eps[:1])
