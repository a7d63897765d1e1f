"""`python -m starflow2_jax.cli ...` is the same as the `starflow2` console script."""

import sys

from starflow2_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
