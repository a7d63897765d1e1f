"""The model-family registry: ``model.family`` name → ``train.family.Family``.

Built-in families are listed in ``BUILTIN`` (name → the module that defines ``FAMILY``) and imported
on first use, so naming one family never imports another's models. Adding a family is one module
defining ``FAMILY = Family(...)`` plus one line in ``BUILTIN``; code outside the package (a test, an
experiment) calls ``register(family)`` instead.
"""

from __future__ import annotations

import importlib

from starflow2_jax.train.family import Family

BUILTIN = {
    "flow": "starflow2_jax.train.tasks.flow",
    "fae": "starflow2_jax.train.tasks.fae",
    "starflow2": "starflow2_jax.train.tasks.starflow2",
    "lm": "starflow2_jax.train.tasks.lm",
}
_REGISTERED: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Adds ``family`` under its name; ValueError if the name is taken (unless ``replace``)."""
    if not isinstance(family, Family):
        raise TypeError(f"register({family!r}): expected a train.family.Family")
    if not replace and (family.name in BUILTIN or family.name in _REGISTERED):
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTERED[family.name] = family
    return family


def unregister(name: str) -> None:
    """Removes a family added with ``register`` (built-in ones stay)."""
    _REGISTERED.pop(name, None)


def names() -> tuple[str, ...]:
    """Every family name: the built-in ones, then the registered ones."""
    return tuple(BUILTIN) + tuple(n for n in _REGISTERED if n not in BUILTIN)


def get(name: str) -> Family:
    """The family called ``name``; ValueError naming ``model.family`` and the known names otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise ValueError(f"model.family={name!r}: expected one of {names()}")
    family = importlib.import_module(BUILTIN[name]).FAMILY
    if family.name != name:
        raise RuntimeError(f"{BUILTIN[name]}.FAMILY is named {family.name!r}, registered as {name!r}")
    return family


def all_families() -> tuple[Family, ...]:
    """Every family, in ``names()`` order."""
    return tuple(get(n) for n in names())


def make_task(config):
    """The ``Task`` of a resolved config's family (``model.family``)."""
    return get(config.model.family).make_task(config)


def require(config, offer: str, workdir) -> Family:
    """The family of a run's ``config`` when it offers ``offer`` (``'sample'`` or an evaluation kind
    such as ``'bpd'``); ValueError naming the workdir, its family and what that family offers otherwise."""
    family = get(config.model.family)
    offers = (("sample",) if family.samples else ()) + tuple(f"eval {e}" for e in family.evaluations)
    wanted = offer if offer == "sample" else f"eval {offer}"
    if wanted not in offers:
        raise ValueError(f"`starflow2 {wanted}` does not apply to {str(workdir)!r}: it holds a "
                         f"model.family={family.name!r} run, whose family offers {list(offers) or 'no command'}")
    return family
