"""Trainer component spec: inputs (EmbeddingStats run directories), outputs, parameters."""

from __future__ import annotations

import dataclasses
import math
import os

from components import loss_settings
from components.trainer import fileio

PAIR_SCOPES = ("example", "batch")  # pairs within each image, or across all images of a batch

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 16  # sets (images) per training step
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_VALIDATION_FRACTION = 0.2
DEFAULT_SHUFFLE_BUFFER = 256  # sets held by the shuffle buffer (memory: buffer * boxes * dim floats)

# Output layout under --output.
SAVED_MODEL_DIR = "saved_model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"  # per-epoch figures, written before each checkpoint
OPTIONS_FILE = "train_options.json"  # options of the run, checked when resuming

# Options that may differ between an interrupted run and its resumption.
RESUMABLE_OPTIONS = ("epochs", "stop_after_epoch")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Parameters of one training run (the `tripletflow train` flags)."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    mining: str = loss_settings.DEFAULT_MINING
    margin: float = loss_settings.DEFAULT_MARGIN
    distance: str = loss_settings.DEFAULT_DISTANCE
    learning_rate: float = DEFAULT_LEARNING_RATE
    hidden: tuple[int, ...] = ()  # widths of hidden ReLU layers before the output layer
    seed: int = 0
    pair_scope: str = "example"
    mixed_precision: bool = False
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    stop_after_epoch: int | None = None  # stop (as if interrupted) once this epoch is checkpointed
    export: bool = True  # write the SavedModel (needs the runs' transform_graph/)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        try:
            loss_settings.check_mining(self.mining)
            loss_settings.LossSettings(margin=self.margin, distance=self.distance)
        except ValueError as error:
            raise ValueError(f"--{error}") from None
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"--hidden widths must be positive integers, got {self.hidden}")
        if self.pair_scope not in PAIR_SCOPES:
            raise ValueError(f"--pair-scope must be one of {PAIR_SCOPES}, got {self.pair_scope!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {self.validation_fraction}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle buffer must be >= 1, got {self.shuffle_buffer}")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 1:
            raise ValueError(f"stop_after_epoch must be >= 1, got {self.stop_after_epoch}")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """Inputs: EmbeddingStats output directories; output: one directory; parameters: TrainOptions."""

    stats_dirs: tuple[str, ...]
    output_dir: str
    options: TrainOptions = TrainOptions()

    def __post_init__(self):
        if not self.stats_dirs:
            raise ValueError("at least one --stats directory is required")
        for path in self.stats_dirs:
            if not fileio.isdir(path):  # local path or URI (gs://...): tf.io.gfile
                raise ValueError(f"--stats {path!r} is not a directory")

    @property
    def saved_model_dir(self) -> str:
        return os.path.join(self.output_dir, SAVED_MODEL_DIR)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINT_DIR)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.output_dir, METRICS_FILE)
