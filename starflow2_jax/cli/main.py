"""Entry point of the `starflow2` command.

Every subcommand lives in its own module under `starflow2_jax.cli` and is listed once in
`SUBCOMMANDS`. A subcommand module defines:

    NAME: str                                    the word typed on the command line
    HELP: str                                    one line shown by `starflow2 --help`
    add_arguments(parser: ArgumentParser) -> None
    run(args: argparse.Namespace) -> int         the exit status
    EXTRA_ARGS: bool = False                     optional: True passes arguments argparse does not
                                                 know (`--config.a.b=v` overrides) as `args.extra`

Module top levels must stay cheap (no JAX import) so that `--help` is instant; import heavy
dependencies inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

import starflow2_jax

# To add a subcommand: write starflow2_jax/cli/<name>.py and add its module path here.
SUBCOMMANDS: tuple[str, ...] = (
    "starflow2_jax.cli.version",
    "starflow2_jax.cli.convert",
    "starflow2_jax.cli.train",
    "starflow2_jax.cli.sample",
    "starflow2_jax.cli.generate",
    "starflow2_jax.cli.eval",
    "starflow2_jax.cli.aot",
)

_INTERFACE = ("NAME", "HELP", "add_arguments", "run")


def _load(module_path: str) -> ModuleType:
    """Imports a subcommand module and checks that it has the interface described above."""
    module = importlib.import_module(module_path)
    missing = [attr for attr in _INTERFACE if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"subcommand module {module_path} lacks {', '.join(missing)}")
    return module


def build_parser() -> argparse.ArgumentParser:
    """Returns the `starflow2` parser with one subparser per entry of `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="starflow2", description="starflow2-jax: STARFlow2 in JAX/Flax."
    )
    parser.add_argument(
        "--version", action="version", version=f"starflow2-jax {starflow2_jax.__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for module_path in SUBCOMMANDS:
        module = _load(module_path)
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, extra_ok=getattr(module, "EXTRA_ARGS", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default `sys.argv[1:]`), runs the chosen subcommand, returns its exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "extra_ok", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.extra = extra
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
