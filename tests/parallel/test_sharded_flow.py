"""Flows on a (2 data × 2 fsdp × 2 tensor) mesh compute what they compute on one device.

Oracle: the same functions on unsharded inputs (one device, no mesh). Variables come from
``parallel.init_sharded`` (a jitted ``flow.init_boxed``), every parameter is perturbed by small noise
(so proj_out is nonzero), the 'prior' collection is left alone; the same values are then used
replicated on one device and sharded by ``FLOW_RULES``. The sharded calls run inside
``activation_rules`` so the models' activation constraints are active.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from starflow2_jax import flow, parallel

pytestmark = pytest.mark.slow

BATCH = 8  # divisible by data × fsdp = 4
ATOL = 1e-5


def _tarflow():
    config = flow.tarflow_config(3, 16, 4, 64, 2, 1, num_classes=10)  # 16 tokens of 48 features
    labels = np.array([0, 1, 2, 3, 4, 5, 9, -1], np.int32)  # −1: dropped label (mean class embedding)
    return config, labels, None, 2.0


def _starflow():
    config = flow.starflow_config(4, 8, 1, 64, layers_per_block=[1, 2], head_dim=32, txt_size=8, txt_dim=16)
    rng = np.random.default_rng(5)
    text = rng.standard_normal((BATCH, 8, 16)).astype(np.float32)
    uncond = 0.1 * rng.standard_normal((BATCH, 8, 16)).astype(np.float32)
    return config, text, uncond, 3.6


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module", params=["tarflow", "starflow"])
def case(request, mesh):
    config, cond, uncond, guidance = {"tarflow": _tarflow, "starflow": _starflow}[request.param]()
    init_fn = functools.partial(flow.init_boxed, config)
    shardings = parallel.variable_shardings(init_fn, mesh, parallel.FLOW_RULES)
    initial = parallel.init_sharded(init_fn, jax.random.key(0), mesh, parallel.FLOW_RULES)
    host = jax.device_get(initial)
    rng = np.random.default_rng(1)
    host["params"] = jax.tree.map(
        lambda p: (p + 0.02 * rng.standard_normal(p.shape)).astype(np.float32), host["params"])
    rng = np.random.default_rng(2)
    images = rng.standard_normal((BATCH, *config.image_size, config.in_channels)).astype(np.float32)
    noise = rng.standard_normal((BATCH, config.num_tokens, config.token_dim)).astype(np.float32)
    single = dict(variables=jax.tree.map(jnp.asarray, host), images=jnp.asarray(images), noise=jnp.asarray(noise),
                  cond=jnp.asarray(cond), uncond=None if uncond is None else jnp.asarray(uncond))
    sharded = dict(variables=parallel.shard_variables(host, shardings),
                   **dict(zip(("images", "noise", "cond", "uncond"),
                              parallel.shard_batch((images, noise, cond, uncond), mesh))))
    return SimpleNamespace(name=request.param, config=config, guidance=guidance, initial=initial,
                           shardings=shardings, single=SimpleNamespace(**single),
                           sharded=SimpleNamespace(**sharded))


def _run(case, mesh, fn):
    """fn(inputs) on one device and on the mesh → (single-device result, sharded result)."""
    expected = jax.block_until_ready(fn(case.single))
    with parallel.activation_rules(mesh, parallel.FLOW_RULES):
        got = jax.block_until_ready(fn(case.sharded))
    return expected, got


def _assert_on_mesh(array, mesh):
    assert isinstance(array.sharding, NamedSharding), array.sharding
    assert array.sharding.mesh == mesh
    assert array.sharding.device_set == set(mesh.devices.flat)


def test_variables_and_batch_are_sharded(case, mesh):
    for got, want in zip(jax.tree.leaves(case.initial), jax.tree.leaves(case.shardings)):
        assert got.sharding == want  # init_sharded creates them in place
    params = case.sharded.variables["params"]
    kernel = params["blocks_0"]["layers"]["mlp"]["wi"]["kernel"]  # (layers, embed, mlp)
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert not kernel.sharding.is_fully_replicated
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 2)
    assert case.sharded.variables["prior"]["var"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(case.sharded.variables["prior"]["var"]), 1.0)  # untouched
    for name in ("images", "noise", "cond", "uncond"):
        array = getattr(case.sharded, name)
        if array is None:
            continue
        _assert_on_mesh(array, mesh)
        assert array.sharding.spec[0] == ("data", "fsdp")
        assert len({shard.index[0].start for shard in array.addressable_shards}) == 4  # batch split 4 ways
        assert array.sharding.shard_shape(array.shape)[0] == BATCH // 4


def test_forward_matches_single_device(case, mesh):
    config = case.config
    (z0, ld0), (z1, ld1) = _run(case, mesh, lambda inp: flow.forward(config, inp.variables, inp.images, inp.cond))
    _assert_on_mesh(z1, mesh)
    _assert_on_mesh(ld1, mesh)
    assert float(jnp.max(jnp.abs(z0))) > 1.0  # the perturbed blocks transform their input
    np.testing.assert_allclose(np.asarray(z1), np.asarray(z0), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ld1), np.asarray(ld0), rtol=0, atol=ATOL)
    assert float(jnp.max(jnp.abs(ld0))) > 1e-2  # nonzero log-dets: proj_out is not the zero init

    with parallel.activation_rules(mesh, parallel.FLOW_RULES):  # the activation constraints reach the program
        hlo = jax.jit(lambda v, x, c: flow.forward(config, v, x, c)).lower(
            case.sharded.variables, case.sharded.images, case.sharded.cond).as_text()
    assert "sharding_constraint" in hlo


def test_sequential_sampling_matches_single_device(case, mesh):
    config = case.config
    (x0, info0), (x1, info1) = _run(case, mesh, lambda inp: flow.sample(
        config, inp.variables, inp.noise, inp.cond, return_info=True))
    _assert_on_mesh(x1, mesh)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x0), rtol=0, atol=ATOL)
    steps = config.num_tokens - (0 if config.sos else 1)
    np.testing.assert_array_equal(np.asarray(info0["iterations"]), steps)
    np.testing.assert_array_equal(np.asarray(info1["iterations"]), steps)


def test_guided_jacobi_sampling_matches_single_device(case, mesh):
    """Jacobi (16-position chunks, threshold 1e-3) with classifier-free guidance: TarFlow linear guidance
    with labels, STARFlow Gaussian guidance against the uncond text; same samples, same iteration counts."""
    config, guidance = case.config, case.guidance
    (x0, info0), (x1, info1) = _run(case, mesh, lambda inp: flow.sample(
        config, inp.variables, inp.noise, inp.cond, uncond=inp.uncond, guidance=guidance,
        jacobi=dict(block_size=16, threshold=1e-3, max_iters=32), return_info=True))
    _assert_on_mesh(x1, mesh)
    assert np.all(np.isfinite(np.asarray(x0)))
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x0), rtol=0, atol=ATOL)
    iterations = np.asarray(info0["iterations"])
    np.testing.assert_array_equal(np.asarray(info1["iterations"]), iterations)
    assert np.all(iterations < 32), iterations  # converged by the threshold, not by max_iters
