"""Config files by path and preset, and ``--config.a.b=value`` overrides (ml_collections style).

A config file (``configs/demo.py``) is a Python file with ``get_config(arg=None)`` returning an
``ml_collections.ConfigDict``; ``arg`` is the text after the colon in ``configs/demo.py:caption``
(without a colon ``get_config()`` is called with no argument). It may list its presets in
``PRESETS`` (the tests load every one). The files are not a package: they are imported by path,
so ``configs/`` never becomes an importable top-level name. A relative path is looked up in the
working directory, then in the checkout this package lives in (so ``configs/demo.py`` works from
anywhere with an editable install). ``parse_preset`` splits ``arg`` into a preset and modifiers
(``caption,runlocal``) for the config files.

This module imports nothing else from the package: the config files themselves (``ConfigError``,
``parse_preset``), ``bench`` and ``cli`` all use it, and none of them may import ``cli``
(docs/architecture.md, enforced by tests/test_architecture.py).

Overrides follow ``ml_collections.config_flags``: the value text is parsed by the type of the
field it replaces (bool: true/false/1/0/yes/no; int; float; str as given; list/tuple: a Python
literal such as ``[1,1,2]`` or ``0,2``; None: a Python literal, else the text). Unknown fields are
errors naming the field — except under ``model.flow.kwargs``, the factory's free-form keyword
arguments, where new keys are allowed (parsed as Python literals, else text).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

FREE_FORM_GROUPS = ("model.flow.kwargs",)
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message names it."""


def split_spec(spec: str) -> tuple[str, str | None]:
    """``'configs/demo.py:caption'`` → ``('configs/demo.py', 'caption')``; no colon → ``(spec, None)``."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--config {spec!r}: expected FILE.py or FILE.py:PRESET")
    path, sep, arg = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        return spec, None
    return path, arg or None


def resolve_path(path: str) -> Path:
    """The config file ``path`` names (see the module docstring); raises ConfigError if none exists."""
    candidate = Path(path).expanduser()
    tried = [candidate]
    if candidate.is_file():
        return candidate.resolve()
    if not candidate.is_absolute():
        checkout = Path(__file__).resolve().parents[1] / candidate
        tried.append(checkout)
        if checkout.is_file():
            return checkout
    raise ConfigError(f"config file {path!r} not found (looked at {', '.join(str(p) for p in tried)})")


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_starflow2_config_{path.stem}_{uuid.uuid4().hex[:8]}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {os.fspath(path)!r} cannot be imported (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {os.fspath(path)!r} has no get_config(arg=None) function")
    return module


def parse_preset(arg: str | None, presets: Sequence[str], modifiers: Sequence[str] = (),
                 default: str | None = None) -> tuple[str, set[str]]:
    """Splits a config file's ``arg`` ``'name[,modifier...]'`` into ``(preset name, {modifiers})``.

    ``presets``: the accepted names (``default`` when ``arg`` names none); ``modifiers``: switches
    such as ``runlocal``. Raises ConfigError naming an unknown word and listing the accepted ones.
    """
    words = [w.strip() for w in (arg or "").split(",") if w.strip()]
    names = [w for w in words if w in presets]
    unknown = [w for w in words if w not in presets and w not in modifiers]
    if unknown:
        raise ConfigError(f"unknown preset {unknown[0]!r}: expected one of {tuple(presets)}"
                          + (f", optionally with {tuple(modifiers)} (comma-separated)" if modifiers else ""))
    if len(names) > 1:
        raise ConfigError(f"presets {names} exclude each other: pick one of {tuple(presets)}")
    if not names and default is None:
        raise ConfigError(f"no preset given: expected one of {tuple(presets)} (FILE.py:PRESET)")
    return (names[0] if names else default), {w for w in words if w in modifiers}


def load_config(spec: str, overrides: Iterable[str] = ()):
    """The ``ConfigDict`` of ``'FILE.py[:PRESET]'`` with ``overrides`` (``'a.b=value'`` strings) applied.

    Not validated here (``train.config_schema.validate`` does that). Raises ConfigError naming the
    file, the preset or the field that is wrong.
    """
    path_text, arg = split_spec(spec)
    path = resolve_path(path_text)
    module = _import_file(path)
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError as error:
        raise ConfigError(f"config file {path_text!r}: {error}") from error
    except TypeError as error:
        if arg is not None and "positional argument" in str(error):
            raise ConfigError(f"config file {path_text!r} takes no preset, got {arg!r}") from error
        raise
    return apply_overrides(config, overrides)


def _parse_bool(path: str, text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"--config.{path}={text!r}: expected a bool (true/false)")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sequence(path: str, text: str, current: Sequence) -> Sequence:
    value = _literal(text)
    if isinstance(value, str):
        raise ConfigError(f"--config.{path}={text!r}: expected a list literal such as [1, 2] "
                          f"(strings quoted: ['a', 'b'])")
    if not isinstance(value, (list, tuple)):
        value = [value]
    kinds = {type(v) for v in current}
    if kinds == {float}:  # 0,2 for a list of floats: the ints become floats, as a float field would take them
        value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if len(kinds) == 1 and not all(isinstance(v, next(iter(kinds))) for v in value):
        kind = next(iter(kinds)).__name__
        raise ConfigError(f"--config.{path}={text!r}: expected a list of {kind} (like the current {list(current)})")
    return type(current)(value)


def parse_value(path: str, text: str, current: Any) -> Any:
    """``text`` parsed by the type of ``current`` (the field's present value); see the module doc."""
    if isinstance(current, bool):
        return _parse_bool(path, text)
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{path}={text!r}: expected an int") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{path}={text!r}: expected a float") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (list, tuple)):
        return _parse_sequence(path, text, current)
    if current is None:
        return _literal(text)
    raise ConfigError(f"--config.{path}: cannot set a field of type {type(current).__name__} from the command line")


def set_field(config, path: str, text: str) -> None:
    """Sets the dotted field ``path`` of ``config`` from the text ``text`` (parsed by its type)."""
    import ml_collections

    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"--config.{path}: empty field name")
    node = config
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"--config.{path}: unknown field {'.'.join(parts[:depth + 1])!r}")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{path}: {'.'.join(parts[:-1])!r} is not a group of fields")
    if leaf not in node:
        if ".".join(parts[:-1]) in FREE_FORM_GROUPS:
            node[leaf] = _literal(text)
            return
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"--config.{path}: unknown field {path!r} (fields there: {known})")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{path}: is a group of fields; set one of them "
                          f"({', '.join(sorted(current.keys()))})")
    value = parse_value(path, text, current)
    try:
        node[leaf] = value
    except TypeError as error:
        raise ConfigError(f"--config.{path}={text!r}: {error}") from error


def apply_overrides(config, overrides: Iterable[str]):
    """Applies ``'a.b=value'`` overrides in order (``--config.`` prefix optional); returns ``config``."""
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item
        path, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.FIELD=VALUE")
        set_field(config, path, value)
    return config


def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(overrides 'a.b=v', other arguments)`` from an argument list; accepts ``--config.a.b=v`` and
    ``--config.a.b v``."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg}: missing value (expected {arg}=VALUE)")
        else:
            rest.append(arg)
        i += 1
    return overrides, rest
