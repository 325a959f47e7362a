"""`tripletflow` console script: one subcommand per entry point in `pipelines/`.

Each subcommand is a module with `run(argv) -> int`, imported only when used, so that
`tripletflow generate` does not pay for Beam and `tripletflow report` not for TensorFlow.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import os
import sys

from pipelines import tf_log

# subcommand -> (module under pipelines/, one-line help)
COMMANDS = {
    "generate": ("generate", "write sample TFRecord grids of box embeddings"),
    "run": ("embedding_stats", "EmbeddingStats: TFRecord grids -> normalized vectors and triplet statistics (Parquet)"),
    "demo": ("demo", "generate sample data and run EmbeddingStats on it with the local runner"),
    "train": ("train", "Trainer: train an embedding head on EmbeddingStats outputs"),
    "report": ("report", "write report.html and alerts.json for a run's output"),
    "nightly": ("nightly", "run EmbeddingStats for a date partition, or a backfill range"),
}
TENSORFLOW_COMMANDS = frozenset({"generate", "run", "demo", "train", "nightly"})  # started quietly up front


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: each flag with its meaning and its default (none for switches or no default)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


# glibc malloc gives threads their own arenas (up to 8 per core) and rarely returns their free
# space: in a long run, peak RSS crept up ~170 MiB with 10x the data with no data held
# (bench/README_stats.md). One arena per core keeps it flat at no measured speed cost.
_M_ARENA_MAX = -8  # mallopt() parameter number, glibc <malloc.h>


def bound_malloc_arenas() -> None:
    """Caps glibc malloc arenas at one per core, for this process and the workers it starts.

    Called before any thread exists. No-op where malloc is not glibc's or the user set MALLOC_ARENA_MAX.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    arenas = max(2, os.cpu_count() or 2)
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # worker processes (multi-process, portable) read it at start
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc
        pass


# TensorFlow's default CPU allocator returns each large freed tensor to the OS, so every step
# page-faults the loss graph's [boxes, boxes] temporaries in again (11 MB each for a set of
# 1,690 boxes, 183 MB for a batch of 16; 5.6 us a 4 KiB page on this workplace's VMs). Its BFC
# allocator keeps freed blocks for reuse: the Trainer's step 1.6x and the loss graph on dense batches
# 1.7x faster there (bench/README_trainer.md, bench/README_loss.md).
BFC_ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def use_bfc_cpu_allocator() -> None:
    """TensorFlow's CPU tensors from its BFC allocator, in this process and the workers it starts.

    Read by TensorFlow when it first allocates, so called before it is imported. No-op where the user set it.
    """
    os.environ.setdefault(BFC_ALLOCATOR_ENV, "true")


def usage() -> str:
    lines = ["usage: tripletflow COMMAND [options]   (tripletflow COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    bound_malloc_arenas()
    use_bfc_cpu_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tripletflow: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    with tf_log.filtered_startup():  # TensorFlow's start-up lines, at the level the user asked for
        module = importlib.import_module(f"pipelines.{COMMANDS[command][0]}")
        if command in TENSORFLOW_COMMANDS and not {"-h", "--help"} & set(rest):
            tf_log.start_tensorflow()
    return module.run(rest)


if __name__ == "__main__":
    sys.exit(main())
