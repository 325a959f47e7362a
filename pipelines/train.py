"""`tripletflow train`: train a projection head on EmbeddingStats runs (thin entry point)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from components import triplet_loss
from components.trainer import spec as spec_lib


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    d = spec_lib.TrainOptions()
    p = argparse.ArgumentParser(prog="tripletflow train", description="Train an embedding head on EmbeddingStats outputs.")
    p.add_argument("--stats", action="append", required=True, metavar="DIR", help="EmbeddingStats output directory, local or a URI such as gs://... (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="SavedModel, metrics.json and checkpoints go here (local or gs://...)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images (sets) per step, over all devices")
    p.add_argument("--mining", default=d.mining, choices=triplet_loss.MINING)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--distance", default=d.distance, choices=triplet_loss.DISTANCES)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--hidden", type=_widths, default=d.hidden, help="hidden ReLU layer widths, e.g. 256,256 (default: none)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pair-scope", default=d.pair_scope, choices=spec_lib.PAIR_SCOPES)
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute, float32 weights")
    p.add_argument("--validation-fraction", type=float, default=d.validation_fraction)
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="sets held by the shuffle buffer")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip the SavedModel (no transform graph needed)")
    p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate an interruption
    return p


def run(argv) -> int:
    args = parser().parse_args(argv)
    try:
        # Each TrainOptions field has the flag of the same name (dest), so none is listed twice.
        options = spec_lib.TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(spec_lib.TrainOptions)})
        spec = spec_lib.TrainerSpec(tuple(args.stats), args.output, options)
    except ValueError as error:
        print(f"tripletflow train: {error}", file=sys.stderr)
        return 2
    from components.trainer.executor import Executor  # TensorFlow only once the flags are valid

    try:
        document = Executor(spec).run()
    except ValueError as error:  # bad inputs or options: a clear message, not a traceback
        print(f"tripletflow train: {error}", file=sys.stderr)
        return 2
    print(f"{document['status']}: metrics in {spec.metrics_path}")
    for name in ("baseline", "trained"):
        figures = document.get("validation", {}).get(name)
        if figures:
            print(
                f"  {name:<8} batch_all {figures['mean_batch_all_loss']}  roc_auc {figures['roc_auc']}  "
                f"recall@1 {figures['recall_at_1']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
