"""Trainer executor: device strategy, deterministic training loop, checkpoints, metrics, export.

One code path for every device: a `tf.distribute` strategy (mirrored over all visible GPUs
when there are several, one GPU, or the CPU) runs a custom `tf.function` train step. Each
epoch's shuffle is seeded by (seed, epoch) and the head's initialisation by the seed, so an
interrupted run restored from its last checkpoint ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf
import tf_keras

from components.trainer import data, fileio, metrics, model
from components.trainer import spec as spec_lib
from schemas import contract

CHECKPOINTS_KEPT = 3


def choose_strategy() -> tf.distribute.Strategy:
    """Mirrored over all GPUs when there are several, else the one GPU, else the CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


# EmbeddingStats options that shape the vectors: runs trained together must agree on them.
PREPROCESSING_OPTIONS = ("normalize", "center")


def run_grid(stats_dirs, dim: int) -> contract.GridSpec | None:
    """The runs' common grid from their MANIFEST options (None when a manifest does not say).

    Also refuses runs whose vectors were preprocessed differently (normalize/center), since
    one head and one serving transform cannot fit both.
    """
    grids = set()
    preprocessing = {}
    for stats_dir in stats_dirs:
        options = data.read_manifest(stats_dir).get("options", {})
        preprocessing[stats_dir] = {k: options.get(k) for k in PREPROCESSING_OPTIONS}
        grids.add(
            tuple(contract.GridSpec.parse(options["grid"], options.get("dim", dim)).grid_shape)
            if "grid" in options
            else None
        )
    if len({json.dumps(v, sort_keys=True) for v in preprocessing.values()}) > 1:
        raise ValueError(f"--stats runs were preprocessed differently: {preprocessing}")
    if None in grids:
        return None
    if len(grids) != 1:
        raise ValueError(f"--stats runs have different grids {sorted(grids)}; train on runs of one grid")
    return contract.GridSpec(*grids.pop(), dim=dim)


def check_transform_graph(stats_dir: str, grid: contract.GridSpec) -> None:
    """ValueError unless the run's transform graph takes one box (schemas/box_schema.pbtxt), as serving feeds it.

    Runs written before the per-box graph have a whole-grid graph: refused before training, not at export.
    """
    import tensorflow_transform as tft

    path = data.transform_graph_dir(stats_dir)
    try:
        found = tft.TFTransformOutput(path).raw_feature_spec()
    except (OSError, ValueError, tf.errors.OpError) as error:  # absent or unreadable metadata
        raise ValueError(f"--stats {stats_dir}: no readable transform graph in {path}: {error}") from None
    want = {feature.name for feature in contract.box_schema(grid).feature}
    if set(found) != want:
        raise ValueError(
            f"--stats {stats_dir}: its transform graph takes {sorted(found)}, not one box {sorted(want)} "
            f"(written by an older tripletflow?); re-run `tripletflow run` on its input to export a model"
        )


def _check_resume(spec: spec_lib.TrainerSpec) -> None:
    """Refuses to resume a run in `output_dir` that used other options or inputs."""
    path = os.path.join(spec.output_dir, spec_lib.OPTIONS_FILE)
    current = {"options": spec.options.to_json(), "stats_dirs": [fileio.canonical(p) for p in spec.stats_dirs]}
    previous = fileio.read_json(path)
    if previous is not None:
        for key in spec_lib.RESUMABLE_OPTIONS:
            previous["options"].pop(key, None)
        compare = {
            **current,
            "options": {k: v for k, v in current["options"].items() if k not in spec_lib.RESUMABLE_OPTIONS},
        }
        if previous != compare:
            raise ValueError(
                f"{spec.output_dir!r} holds a run with other options or inputs ({previous}); "
                f"use another --output or the same options"
            )
    fileio.write_json(path, current)


class Executor:
    """Runs one TrainerSpec: `Executor(spec).run()` -> the metrics.json document."""

    def __init__(
        self, spec: spec_lib.TrainerSpec, verbose: bool = True, strategy: tf.distribute.Strategy | None = None
    ):
        self.spec = spec
        self.strategy = strategy  # None: choose_strategy() (tests pass a mirrored one over virtual CPUs)
        self.options = spec.options
        self.verbose = verbose

    # ------------------------------------------------------------------ data
    def dataset(self, split: str, dim: int, epoch: int | None):
        o = self.options
        return data.make_dataset(
            self.spec.stats_dirs,
            dim,
            split,
            o.validation_fraction,
            o.batch_size,
            shuffle_seed=None if epoch is None else data.epoch_seed(o.seed, epoch),
            shuffle_buffer=o.shuffle_buffer,
        )

    def count_sets(self) -> dict:
        """Sets per split, from the example_id column only (cheap): the progress bar's target."""
        counts = {data.TRAIN: 0, data.VALIDATION: 0}
        for stats_dir in self.spec.stats_dirs:
            seen = set()
            for path in data.vector_files(stats_dir):
                with fileio.open_parquet(path) as reader:
                    for batch in reader.iter_batches(columns=[data.ID_COLUMN]):
                        seen.update(batch.column(0).to_pylist())
            for example_id in seen:
                split = (
                    data.VALIDATION if data.is_validation(example_id, self.options.validation_fraction) else data.TRAIN
                )
                counts[split] += 1
        return counts

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        o, spec = self.options, self.spec
        for stats_dir in spec.stats_dirs:
            data.read_manifest(stats_dir)  # unfinished runs are refused before anything else
        dim = data.embedding_dim(spec.stats_dirs)
        grid = run_grid(spec.stats_dirs, dim)
        if o.export and grid is None:
            raise ValueError("the runs' MANIFEST.json options give no grid: cannot export a serving model")
        if o.export:
            check_transform_graph(spec.stats_dirs[0], grid)
        counts = self.count_sets()
        if counts[data.TRAIN] == 0 or counts[data.VALIDATION] == 0:
            raise ValueError(f"empty split {counts}: add data or change --validation-fraction")
        fileio.makedirs(spec.output_dir)
        _check_resume(spec)

        strategy = self.strategy or choose_strategy()
        head, optimizer = self.build_model(strategy, dim)
        with strategy.scope():
            epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(head=head, optimizer=optimizer, epoch=epoch_var)
        manager = tf.train.CheckpointManager(checkpoint, spec.checkpoint_dir, max_to_keep=CHECKPOINTS_KEPT)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        start_epoch = int(epoch_var.numpy())
        history_path = os.path.join(spec.output_dir, spec_lib.HISTORY_FILE)
        history = [h for h in fileio.read_json(history_path, []) if h["epoch"] <= start_epoch]
        if self.verbose and start_epoch:
            print(f"resuming from checkpoint after epoch {start_epoch}")

        train_step = self.train_step(strategy, head, optimizer)
        status = "complete"
        for epoch in range(start_epoch + 1, o.epochs + 1):
            history.append(self._epoch(strategy, train_step, dim, epoch, counts[data.TRAIN]))
            fileio.write_json(history_path, history)  # before the checkpoint: never a checkpoint without its history
            epoch_var.assign(epoch)
            manager.save(checkpoint_number=epoch)
            if o.stop_after_epoch is not None and epoch >= o.stop_after_epoch and epoch < o.epochs:
                status = "interrupted"
                break

        document = {
            "status": status,
            "options": o.to_json(),
            "stats_dirs": list(spec.stats_dirs),
            "dim": dim,
            "grid": grid.as_list() if grid else None,
            "device": {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync},
            "counts": {"train_examples": counts[data.TRAIN], "validation_examples": counts[data.VALIDATION]},
            "epochs": history,
        }
        if status == "complete":
            validation = self.dataset(data.VALIDATION, dim, None)
            baseline = model.ProjectionHead(dim, identity=True)
            document["validation"] = {
                "baseline": metrics.evaluate(
                    tf.function(baseline, reduce_retracing=True, autograph=False), validation, o.margin, o.distance
                ),
                "trained": metrics.evaluate(
                    tf.function(head, reduce_retracing=True, autograph=False), validation, o.margin, o.distance
                ),
            }
            if o.export:
                self.export(head, grid)
                document["saved_model"] = spec.saved_model_dir
        fileio.write_json(spec.metrics_path, document)
        self.head = head
        return document

    def build_model(self, strategy: tf.distribute.Strategy, dim: int):
        """(head, optimizer) in `strategy`'s scope: the projection head [.., dim] -> [.., dim] and its Adam."""
        o = self.options
        with strategy.scope():
            head = model.ProjectionHead(
                dim, dim, hidden=o.hidden, seed=o.seed, compute_dtype=tf.float16 if o.mixed_precision else tf.float32
            )
            optimizer = tf_keras.optimizers.Adam(o.learning_rate)
            if o.mixed_precision:
                optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
            optimizer.build(head.trainable_variables)
        return head, optimizer

    def train_step(self, strategy, head, optimizer):
        """The compiled step: one distributed batch -> its loss (summed over replicas), the head updated."""
        o = self.options
        replicas = strategy.num_replicas_in_sync

        def step(batch):
            with tf.GradientTape() as tape:
                out = head(batch["embeddings"])
                loss = model.training_loss(
                    out, batch["labels"], mining=o.mining, margin=o.margin, distance=o.distance, pair_scope=o.pair_scope
                )
                scaled = loss / replicas
                if o.mixed_precision:
                    scaled = optimizer.get_scaled_loss(scaled)
            grads = tape.gradient(scaled, head.trainable_variables)
            if o.mixed_precision:
                grads = optimizer.get_unscaled_gradients(grads)
            optimizer.apply_gradients(zip(grads, head.trainable_variables))
            return loss / replicas

        # autograph=False: no tensor-dependent Python control flow here or in the loss graph,
        # and tracing does not depend on re-parsing source files.
        @tf.function(reduce_retracing=True, autograph=False)
        def train_step(batch):
            per_replica = strategy.run(step, args=(batch,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return train_step

    def _epoch(self, strategy, train_step, dim: int, epoch: int, n_sets: int) -> dict:
        o = self.options
        dataset = strategy.experimental_distribute_dataset(self.dataset(data.TRAIN, dim, epoch))
        steps_target = -(-n_sets // o.batch_size)
        progbar = tf_keras.utils.Progbar(steps_target, verbose=1 if self.verbose else 0, unit_name="step")
        if self.verbose:
            print(f"epoch {epoch}/{o.epochs}")
        start = time.perf_counter()
        total, steps = 0.0, 0
        for batch in dataset:
            loss = float(train_step(batch))
            total += loss
            steps += 1
            progbar.update(steps, [("loss", loss)])
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch,
            "loss": total / steps if steps else None,
            "steps": steps,
            "examples": n_sets,
            "seconds": seconds,
            "examples_per_second": n_sets / seconds if seconds > 0 else None,
        }

    def export(self, head, grid: contract.GridSpec) -> str:
        """SavedModel: raw embeddings -> first run's transform graph -> head (see model.ServingModule)."""
        import tensorflow_transform as tft

        tft_output = tft.TFTransformOutput(data.transform_graph_dir(self.spec.stats_dirs[0]))
        serving = model.ServingModule(head, tft_output, grid)
        serving.save(self.spec.saved_model_dir)
        return self.spec.saved_model_dir
