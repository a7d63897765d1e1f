"""Field checks shared by the config schema and the model families' sections.

Each check reads one dotted field of an ``ml_collections.ConfigDict`` and raises ValueError whose
message starts with that field's name (``model.fae.stage='x': expected one of ...``). The choices
every family shares (compute dtypes, remat policies) are defined here once.
"""

from __future__ import annotations

import math
from typing import Sequence

from starflow2_jax.nn.remat import REMAT_POLICIES

DTYPES = ("float32", "bfloat16", "float16")
REMAT = tuple(REMAT_POLICIES)  # the policies nn.remat_layer knows, one list for every model


def get(config, path: str):
    """The value of the dotted field ``path``; ValueError naming it when it is missing."""
    node = config
    for part in path.split("."):
        if part not in node:
            raise ValueError(f"config field {path!r} is missing (see starflow2_jax.train.config_schema)")
        node = node[part]
    return node


def int_field(config, path: str, minimum: int | None = None, allow: Sequence[int] = ()) -> int:
    """An int >= ``minimum`` (or one of ``allow``)."""
    value = get(config, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}={value!r}: expected an int")
    if value in allow:
        return value
    if minimum is not None and value < minimum:
        raise ValueError(f"{path}={value!r}: expected an int >= {minimum}")
    return value


def float_field(config, path: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number in [low, high] (either bound optional); NaN and ±inf are rejected (a NaN
    compares False with every bound, so it would otherwise pass, e.g. turning clipping off)."""
    value = get(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}={value!r}: expected a number")
    if not math.isfinite(value):
        raise ValueError(f"{path}={value!r}: expected a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{path}={value!r}: expected a number in [{low}, {high}]")
    return float(value)


def choice(config, path: str, allowed: Sequence[str]) -> str:
    """One of ``allowed``."""
    value = get(config, path)
    if value not in allowed:
        raise ValueError(f"{path}={value!r}: expected one of {tuple(allowed)}")
    return value


def string_field(config, path: str, what: str = "a string") -> str:
    """A string (``what`` describes it in the error, e.g. "a path ('' for none)")."""
    value = get(config, path)
    if not isinstance(value, str):
        raise ValueError(f"{path}={value!r}: expected {what}")
    return value


def dict_field(config, path: str, what: str = "a dict") -> object:
    """A mapping (a ``ConfigDict``)."""
    value = get(config, path)
    if not hasattr(value, "keys"):
        raise ValueError(f"{path}={value!r}: expected {what}")
    return value
