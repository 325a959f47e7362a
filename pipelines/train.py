"""`tripletflow train`: train a projection head on EmbeddingStats runs (thin entry point)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from components import loss_settings
from components.trainer import spec as spec_lib
from pipelines.cli import HelpFormatter
from pipelines.exit_codes import ExitCode


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    d = spec_lib.TrainOptions()
    p = argparse.ArgumentParser(
        prog="tripletflow train",
        description="Train an embedding head on EmbeddingStats outputs.",
        formatter_class=HelpFormatter,
        epilog=f"Exit codes: {ExitCode.OK} trained; {ExitCode.USAGE} bad flags or inputs.",
    )
    p.add_argument(
        "--stats",
        action="append",
        required=True,
        metavar="DIR",
        help="EmbeddingStats output directory, local or a URI such as gs://... (repeatable)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="SavedModel, metrics.json and checkpoints go here (local or gs://...)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training sets")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images (sets) per step, over all devices")
    p.add_argument("--mining", default=d.mining, choices=loss_settings.MININGS, help="which triplets the loss averages")
    p.add_argument("--margin", type=float, default=d.margin, help="triplet margin")
    p.add_argument("--distance", default=d.distance, choices=loss_settings.DISTANCES, help="pair distance")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="Adam's learning rate")
    p.add_argument(
        "--hidden", type=_widths, default=d.hidden, help="hidden ReLU layer widths, e.g. 256,256 (default: none)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights, split and shuffle")
    p.add_argument(
        "--pair-scope",
        default=d.pair_scope,
        choices=spec_lib.PAIR_SCOPES,
        help="pairs within each image, or across all images of a batch (identity labels global)",
    )
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute, float32 weights")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=d.validation_fraction,
        help="fraction of the images held out for the validation figures",
    )
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="sets held by the shuffle buffer")
    p.add_argument(
        "--no-export", dest="export", action="store_false", help="skip the SavedModel (no transform graph needed)"
    )
    p.add_argument(
        "--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS
    )  # tests: simulate an interruption
    return p


def run(argv) -> int:
    args = parser().parse_args(argv)
    try:
        # Each TrainOptions field has the flag of the same name (dest), so none is listed twice.
        options = spec_lib.TrainOptions(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(spec_lib.TrainOptions)}
        )
        spec = spec_lib.TrainerSpec(tuple(args.stats), args.output, options)
    except ValueError as error:
        print(f"tripletflow train: {error}", file=sys.stderr)
        return ExitCode.USAGE
    from components.trainer.executor import Executor  # TensorFlow only once the flags are valid

    try:
        document = Executor(spec).run()
    except ValueError as error:  # bad inputs or options: a clear message, not a traceback
        print(f"tripletflow train: {error}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"{document['status']}: metrics in {spec.metrics_path}")
    for name in ("baseline", "trained"):
        figures = document.get("validation", {}).get(name)
        if figures:
            print(
                f"  {name:<8} batch_all {figures['mean_batch_all_loss']}  roc_auc {figures['roc_auc']}  "
                f"recall@1 {figures['recall_at_1']}"
            )
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
