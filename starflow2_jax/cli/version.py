"""`starflow2 version`: package, JAX and Flax versions and the visible devices, as JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys

NAME = "version"
HELP = "print package, jax and flax versions and the visible devices as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")


def describe() -> dict:
    """Returns a JSON-serialisable dict: versions, backend, process and one entry per device."""
    # Imported here so that `starflow2 --help` does not pay for JAX.
    import flax  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel

    import starflow2_jax  # pylint: disable=import-outside-toplevel

    return {
        "starflow2_jax": starflow2_jax.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [
            {
                "id": d.id,
                "platform": d.platform,
                "kind": d.device_kind,
                "process_index": d.process_index,
            }
            for d in jax.devices()
        ],
    }


def run(args: argparse.Namespace) -> int:
    json.dump(describe(), sys.stdout, indent=args.indent)
    sys.stdout.write("\n")
    return 0
