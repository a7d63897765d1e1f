"""Mesh construction, the rules tables with their divisibility fallback, and batch/variable shardings."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from starflow2_jax import flow, parallel


# ---- make_mesh ------------------------------------------------------------------------------
def test_make_mesh_axes_sizes_and_auto_types():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert set(mesh.devices.flat) == set(jax.devices())


@pytest.mark.parametrize("shape, expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"fsdp": -1, "tensor": 2}, (1, 4, 2)),
    ((2, -1, 1), (2, 4, 1)),
    ([1, 1, 8], (1, 1, 8)),
])
def test_make_mesh_fills_one_minus_one(shape, expected):
    assert tuple(parallel.make_mesh(shape).devices.shape) == expected


def test_make_mesh_on_a_device_subset():
    mesh = parallel.make_mesh({"data": 2, "tensor": -1}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize("shape, message", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "product 4 does not match the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 2, "model": 4}, "unknown axis name(s) ['model']"),
    ({"data": 0, "fsdp": -1}, "'data' size 0"),
    ({"tensor": -2, "data": -1}, "'tensor' size -2"),
    ({"data": 3, "fsdp": -1}, "cannot infer 'fsdp'"),
    ({"data": 2.0, "fsdp": 4}, "'data' size 2.0"),
    ((2, 4), "expected 3 sizes"),
])
def test_make_mesh_errors_name_the_bad_value(shape, message):
    with pytest.raises(ValueError) as err:
        parallel.make_mesh(shape)
    assert message in str(err.value)


# ---- rules and the divisibility fallback ------------------------------------------------------
@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_rules_tables_map_the_documented_names():
    rules = dict(parallel.FLOW_RULES)
    assert rules["embed"] == "fsdp"
    assert rules["mlp"] == rules["heads"] == rules["kv_heads"] == "tensor"
    for name in ("head_dim", "latent", "classes", "seq", "layers", "text_embed", "act_seq", "act_embed"):
        assert rules[name] is None, name
    assert rules["act_batch"] == ("data", "fsdp")
    assert rules["act_heads"] == rules["act_mlp"] == "tensor"
    assert dict(parallel.DEFAULT_RULES)["vocab"] == "tensor"


@pytest.mark.parametrize("spec, shape, expected", [
    (P("fsdp", "tensor"), (64, 256), P("fsdp", "tensor")),
    (P("fsdp", "tensor"), (3, 256), P(None, "tensor")),  # 3 % 2: replicated
    (P(None, "tensor", None), (4, 1, 32), P(None, None, None)),  # one head over tensor=2
    (P(("data", "fsdp")), (6, 5), P(None, None)),  # 6 % 4 (and the spec is padded to rank 2)
    (P(("data", "fsdp")), (8, 5), P(("data", "fsdp"), None)),
])
def test_fit_spec_replicates_non_dividing_dimensions(mesh, spec, shape, expected):
    assert parallel.fit_spec(spec, shape, mesh) == expected


class _Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
        boxed = lambda names: nn.with_logical_partitioning(nn.initializers.ones, names)  # noqa: E731
        self.param("even", boxed(("embed", "mlp")), (64, 256))
        self.param("odd", boxed(("embed", "heads", "head_dim")), (64, 3, 32))
        self.param("tiny", boxed(("latent", "embed")), (3, 5))
        self.variable("stats", "count", jnp.zeros, (5,))
        return x


def test_logical_shardings_follow_rules_with_fallback(mesh):
    abstract = jax.eval_shape(_Odd().init, jax.random.key(0), jnp.zeros(()))
    shardings = parallel.logical_shardings(abstract, mesh, parallel.FLOW_RULES)
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.meta.unbox(abstract))
    params = shardings["params"]
    assert params["even"].spec == P("fsdp", "tensor")
    assert params["odd"].spec == P("fsdp", None, None)  # 3 heads do not split over tensor=2
    assert params["tiny"].spec == P(None, None)  # width 5 does not split over fsdp=2
    assert shardings["stats"]["count"].spec == P()


def test_logical_shardings_reject_unknown_names_and_axes(mesh):
    abstract = jax.eval_shape(_Odd().init, jax.random.key(0), jnp.zeros(()))
    rules = tuple(rule for rule in parallel.FLOW_RULES if rule[0] != "mlp")
    with pytest.raises(ValueError, match=r"\['params'\]\['even'\].*\['mlp'\]"):
        parallel.logical_shardings(abstract, mesh, rules)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        parallel.logical_shardings(abstract, mesh, parallel.FLOW_RULES + (("extra", "model"),))


def test_flow_variable_shardings_match_init_structure(mesh):
    config = flow.tarflow_config(3, 16, 4, 64, 2, 1, num_classes=10)
    shardings = parallel.variable_shardings(functools.partial(flow.init_boxed, config), mesh, parallel.FLOW_RULES)
    variables = jax.eval_shape(lambda rng: flow.init(config, rng), jax.random.key(0))
    assert jax.tree.structure(shardings) == jax.tree.structure(variables)
    assert shardings["prior"]["var"].spec == P()
    layers = shardings["params"]["blocks_0"]["layers"]
    assert layers["mlp"]["wi"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert layers["attn"]["query"]["kernel"].spec == P(None, "fsdp", None, None)  # 1 head: replicated


# ---- batches and the activation context -------------------------------------------------------
def test_batch_sharding_and_shard_batch(mesh):
    assert parallel.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    images, labels = parallel.shard_batch((np.ones((8, 4, 4, 3), np.float32), np.arange(8)), mesh)
    assert images.sharding == parallel.batch_sharding(mesh, 4)
    assert images.sharding.shard_shape(images.shape) == (2, 4, 4, 3)
    assert labels.sharding.shard_shape(labels.shape) == (2,)
    np.testing.assert_array_equal(np.asarray(labels), np.arange(8))
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 batch shards"):
        parallel.shard_batch(np.ones((6, 2)), mesh)
    with pytest.raises(ValueError, match="ndim=0"):
        parallel.batch_sharding(mesh, 0)


def test_activation_rules_constrain_activations_without_deprecations(mesh):
    def f(x):
        return nn.with_logical_constraint(x * 2, ("act_batch", "act_mlp"))

    x = jnp.ones((8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with parallel.activation_rules(mesh, parallel.FLOW_RULES) as active:
            assert active is mesh
            y = jax.jit(f)(x)
    assert isinstance(y.sharding, NamedSharding)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    assert jax.jit(f)(x).sharding.is_fully_replicated  # outside the context the constraint is a no-op
