"""`tripletflow` console script: one subcommand per entry point in `pipelines/`.

Each subcommand is a module with `run(argv) -> int`, imported only when used, so that
`tripletflow generate` does not pay for Beam and `tripletflow report` not for TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module under pipelines/, one-line help)
COMMANDS = {
    "generate": ("generate", "write sample TFRecord grids of box embeddings"),
    "run": ("embedding_stats", "EmbeddingStats: TFRecord grids -> normalized vectors and triplet statistics (Parquet)"),
    "demo": ("demo", "generate sample data and run EmbeddingStats on it with the local runner"),
    "train": ("train", "Trainer: train an embedding head on EmbeddingStats outputs"),
    "report": ("report", "write report.html and alerts.json for a run's output"),
    "nightly": ("nightly", "run EmbeddingStats for a date partition, or a backfill range"),
}


def usage() -> str:
    lines = ["usage: tripletflow COMMAND [options]   (tripletflow COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow start-up chatter off the console
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tripletflow: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{COMMANDS[command][0]}")
    return module.run(rest)


if __name__ == "__main__":
    sys.exit(main())
