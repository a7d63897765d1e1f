"""``python -m starflow2_jax.bench <name> [args]`` runs ``starflow2_jax.bench.<name>`` with ``args``."""

import importlib
import sys

BENCHMARKS = ("flow", "train", "vlm", "fae", "pretzel")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m starflow2_jax.bench {{{','.join(BENCHMARKS)}}} [--help | benchmark arguments]",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"starflow2_jax.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
