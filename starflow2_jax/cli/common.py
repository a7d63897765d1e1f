"""Helpers shared by the subcommands: console logging and error reporting."""

from __future__ import annotations

import logging
import sys

# INFO lines from these libraries (Orbax's per-save chatter, grain, TFDS, etils) are dropped; their
# warnings and errors still show. --verbose keeps everything.
QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/", "/jax/")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = record.pathname.replace("\\", "/")
        return not any(part in path for part in QUIET_LIBRARIES)


def setup_logging(verbose: bool = False) -> None:
    """absl logging at INFO to stderr (the trainer's metrics, progress and parameter table), without
    the INFO lines of ``QUIET_LIBRARIES`` unless ``verbose``; TFDS progress bars off."""
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():  # no absl.app here; also lets grain's worker processes read flags
        flags.FLAGS.mark_as_parsed()
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    handler = absl_logging.get_absl_handler().python_handler  # sees absl's and Python loggers' records
    for existing in [f for f in handler.filters if isinstance(f, _QuietLibraries)]:
        handler.removeFilter(existing)
    if not verbose:
        handler.addFilter(_QuietLibraries())
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:  # pragma: no cover - a declared dependency
        pass


def fail(command: str, message: object, status: int = 2) -> int:
    """Prints ``starflow2 COMMAND: error: MESSAGE`` to stderr, on one line (a multi-line message's
    lines are joined with spaces), and returns ``status`` (2: bad input; nothing was written)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"starflow2 {command}: error: {text}", file=sys.stderr, flush=True)
    return status


def note(message: str) -> None:
    """A line for the user on stderr (stdout is kept for the JSON result)."""
    print(message, file=sys.stderr, flush=True)


def add_distributed_arguments(parser) -> None:
    """The multi-process flags of every entry point that runs JAX (see ``parallel.runtime``)."""
    group = parser.add_argument_group("multi-process (auto-detected on TPU VMs and under SLURM)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address (or $STARFLOW2_COORDINATOR)")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="number of processes (or $STARFLOW2_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process, 0..N-1 (or $STARFLOW2_PROCESS_ID)")
    group.add_argument("--distributed-timeout", type=int, default=300, metavar="SECONDS",
                       help="how long to wait for the coordinator and the other processes (default 300)")


def start_runtime(args):
    """Starts ``jax.distributed`` from ``args`` (``add_distributed_arguments``). Returns the
    ``parallel.Runtime``; raises ``parallel.DistributedError`` (a RuntimeError naming the settings).
    (``train`` adds this process's log file ``<workdir>/logs/process_<i>.log`` once its checks pass.)"""
    from starflow2_jax import parallel

    return parallel.initialize(args.coordinator, args.num_processes, args.process_id,
                               timeout_s=args.distributed_timeout)
