"""Assembles report.html and alerts.json for one run's output directory."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.compute as pc

from components import storage
from components.report import alerts as alerts_lib
from components.report import figures, html, trainer_metrics
from components.report import history as history_lib
from components.report.run_data import RunData, finite_or_none, load_run
from schemas import contract

WORST_EXAMPLES = 10  # rows of the worst-examples table
WORST_BY = "batch_all_loss"  # the loss the worst examples are ranked by (an EXAMPLE_STATISTIC_COLUMNS name)
WORST_BY_LABEL = "batch-all loss"

# summary.json keys shown as headline figures, with their labels, in two tables: the data
# that went in (rejections by reason follow records_rejected) and the quality of the vectors.
HEADLINE_DATA = (
    ("records_read", "Records in"),
    ("records_good", "Records good"),
    ("records_rejected", "Records rejected"),
    ("examples", "Examples"),
    ("empty_examples", "Empty examples (no valid box)"),
    ("valid_boxes", "Valid boxes"),
    ("identities", "Identities"),
    ("pos_pairs", "Positive pairs"),
    ("neg_pairs", "Negative pairs"),
)
HEADLINE_QUALITY = (
    ("roc_auc", "ROC AUC (negative farther than positive)"),
    ("roc_auc_error_bound", "ROC AUC binning error bound"),
    ("mean_batch_all_loss", "Mean batch-all loss"),
    ("mean_batch_hard_loss", "Mean batch-hard loss"),
    ("mean_semi_hard_loss", "Mean semi-hard loss"),
    ("active_triplet_fraction", "Active-triplet fraction"),
    ("triplets", "Triplets"),
    ("active_triplets", "Active triplets"),
)
NORM_STATS = ("mean", "std", "min", "max")
TREND_PANELS = {
    "ROC AUC": ("roc_auc",),
    "Mean losses": ("mean_batch_all_loss", "mean_batch_hard_loss", "mean_semi_hard_loss"),
    "Mean raw L2 norm": ("mean_norm",),
    "Rejection rate": ("rejection_rate",),
}


def _number(value):
    """JSON numbers as int/float for display (None stays None)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    return finite_or_none(value)


def mean_negative_distance(run: RunData) -> float | None:
    """Mean distance over all negative pairs: per-example means weighted by their pair counts."""
    counts = run.examples.column("n_neg_pairs").to_numpy(zero_copy_only=False).astype(np.float64)
    means = run.examples.column("neg_dist_mean").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    total = counts.sum()
    return float((counts * means).sum() / total) if total else None


def headline_rows(summary: dict, keys) -> list:
    rows = []
    for key, label in keys:
        rows.append((key, [label, _number(summary.get(key))]))
        if key == "records_rejected":
            for reason, count in sorted((summary.get("rejected_by_reason") or {}).items()):
                if not count:
                    continue  # only the reasons that occurred
                rows.append((f"rejected_by_reason.{reason}", [f"Rejected: {reason}", _number(count)]))
    return rows


def worst_examples_rows(run: RunData) -> list:
    table = run.examples.filter(pc.is_valid(run.examples.column(WORST_BY)))
    if table.num_rows == 0:
        return []
    order = pc.sort_indices(table, sort_keys=[(WORST_BY, "descending"), (contract.COL_EXAMPLE_ID, "ascending")])
    top = table.take(order[:WORST_EXAMPLES]).to_pylist()
    return [
        (
            None,
            [
                row[contract.COL_EXAMPLE_ID],
                row["n_boxes"],
                row["n_triplets"],
                row["n_active_triplets"],
                _number(row["batch_all_loss"]),
                _number(row["batch_hard_loss"]),
                _number(row["semi_hard_loss"]),
            ],
        )
        for row in top
    ]


def _trainer_section(run: RunData) -> str:
    metrics = run.trainer_metrics or {}
    state = trainer_metrics.status(metrics)
    parts = [f'<p class="meta">from {html.esc(run.model_dir)}{" · status " + html.esc(state) if state else ""}</p>']
    losses = trainer_metrics.loss_curves(metrics)
    if losses:
        parts.append(
            _figure("trainer loss curve", figures.curves, losses, "Trainer loss per epoch", "epoch", "training loss")
        )
    groups = trainer_metrics.validation_groups(metrics)
    if groups:
        heads = list(groups)
        compare = trainer_metrics.BASELINE in groups and trainer_metrics.TRAINED in groups
        names = list(dict.fromkeys(name for group in groups.values() for name in group))
        rows = []
        for name in names:
            cells = [groups[head].get(name) for head in heads]
            if compare:
                before, after = groups[trainer_metrics.BASELINE].get(name), groups[trainer_metrics.TRAINED].get(name)
                cells.append(after - before if before is not None and after is not None else None)
            rows.append((f"model.{name}", [name, *cells]))
        header = ["validation figure", *heads] + (
            [f"{trainer_metrics.TRAINED} - {trainer_metrics.BASELINE}"] if compare else []
        )
        parts.append(html.table("model-figures", header, rows))
    if not (losses or groups):
        parts.append("<p>The trainer's metrics.json holds no loss curve or validation figures.</p>")
    return "\n".join(parts)


def _history_section(history: history_lib.History, current_date: str | None, current: dict) -> str:
    runs = history.runs + [{"date": current_date or "this run", **current}]
    dates = [run["date"] for run in runs]
    panels = {title: {key: [run.get(key) for run in runs] for key in keys} for title, keys in TREND_PANELS.items()}
    parts = [_figure("trends over earlier runs", figures.trends, dates, panels)]
    rows = [
        (
            None,
            [
                run["date"],
                run.get("records_read"),
                run.get("rejection_rate"),
                run.get("roc_auc"),
                run.get("mean_batch_all_loss"),
                run.get("mean_norm"),
            ],
        )
        for run in runs
    ]
    parts.append(
        html.table(
            "history-runs",
            ["date", "records in", "rejection rate", "ROC AUC", "mean batch-all loss", "mean L2 norm"],
            rows,
        )
    )
    if history.skipped:
        items = "".join(f"<li>{html.esc(s)}</li>" for s in history.skipped)
        parts.append(f"<p>Partitions left out:</p><ul>{items}</ul>")
    return "\n".join(parts)


def _figure(alt: str, draw, *args) -> str:
    """`draw(*args)` as an inlined image, or one line saying why it was not drawn.

    A figure never fails the report: the report of a published run is always written.
    """
    try:
        return html.image(draw(*args), alt)
    except Exception as error:  # noqa: BLE001 - whatever numpy/matplotlib raise on data nobody foresaw
        return (
            f'<p class="meta">{html.esc(alt)}: not drawn ({html.esc(type(error).__name__)}: {html.esc(str(error))})</p>'
        )


def norms_caption(run: RunData) -> str:
    """Says which boxes the norm figures show: all of them, or a uniform sample."""
    shown = run.vectors.num_rows
    if shown == run.vectors_total:
        return f"<p>All {shown:,} valid boxes.</p>"
    return f"<p>A uniform sample of {shown:,} of the run's {run.vectors_total:,} valid boxes.</p>"


def generate_report(
    output_dir: str, history_root: str | None = None, thresholds=None, model_dir: str | None = None
) -> list[dict]:
    """Writes `report.html` and `alerts.json` into a finished run's `output_dir`; returns the alerts.

    `thresholds`: None (defaults), a `Thresholds`, a {name: value} dict or ["NAME=VALUE"];
    `history_root`: root of `date=YYYY-MM-DD` partitions of earlier runs (trends, AUC drop);
    `model_dir`: a trainer output (default: `<output_dir>/model/` when it holds metrics.json).
    """
    limits = alerts_lib.as_thresholds(thresholds)
    run = load_run(output_dir, model_dir)
    summary = run.summary
    date = history_lib.run_date(output_dir, run.manifest)
    history = history_lib.load_history(history_root, output_dir, date) if history_root else None
    current = alerts_lib.run_figures(summary, mean_negative_distance(run))
    found = alerts_lib.check(current, history.runs if history else [], limits)

    # float64: sums of float32 norms near 1e38 (accepted up to validate.MAX_L1_NORM) would overflow.
    l2 = run.vectors.column(contract.COL_L2_NORM).to_numpy(zero_copy_only=False).astype(np.float64)
    l2_z = run.vectors.column(contract.COL_L2_NORM_Z).to_numpy(zero_copy_only=False).astype(np.float64)
    level = run.vectors.column(contract.COL_LEVEL).to_numpy(zero_copy_only=False)
    anchor = run.vectors.column(contract.COL_ANCHOR).to_numpy(zero_copy_only=False)
    norm_summary = summary.get("l2_norm") or {}
    sections = [
        ("alerts-section", "", html.alerts_block(found)),
        (
            "headline-section",
            "Headline figures",
            html.side_by_side(
                html.table("headline", ["data", "value"], headline_rows(summary, HEADLINE_DATA)),
                html.table("headline-quality", ["quality", "value"], headline_rows(summary, HEADLINE_QUALITY)),
                html.table(
                    "norm-stats",
                    ["raw L2 norm", "value"],
                    [(f"l2_norm.{k}", [k, _number(norm_summary.get(k))]) for k in NORM_STATS],
                ),
            ),
        ),
        (
            "distances-section",
            "Pair distances",
            _figure("pair distance histograms", figures.pair_distance_histogram, summary.get("histogram") or {}),
        ),
        (
            "norms-section",
            "Vector norms",
            norms_caption(run)
            + _figure("norm distributions", figures.norm_distributions, l2, l2_z)
            + _figure("norms per level and anchor", figures.norms_by_position, l2, level, anchor),
        ),
        (
            "worst-section",
            f"Worst examples (highest {WORST_BY_LABEL})",
            html.table(
                "worst-examples",
                [
                    "example id",
                    "valid boxes",
                    "triplets",
                    "active triplets",
                    "batch-all loss",
                    "batch-hard loss",
                    "semi-hard loss",
                ],
                worst_examples_rows(run),
            )
            if run.examples.num_rows
            else "<p>No examples.</p>",
        ),
    ]
    if run.trainer_metrics is not None:
        sections.append(("model-section", "Trainer", _trainer_section(run)))
    if history is not None:
        sections.append(
            ("history-section", f"History ({len(history.runs)} earlier runs)", _history_section(history, date, current))
        )
    options = run.manifest.get("options") or {}
    location = os.path.abspath(output_dir) if storage.is_local(output_dir) else output_dir
    meta = html.esc(
        f"{location} · input {run.manifest.get('input_pattern', '?')} · "
        f"{run.manifest.get('start_time', '?')} – {run.manifest.get('end_time', '?')} · "
        f"distance {options.get('distance', (summary.get('histogram') or {}).get('distance', '?'))}"
    )
    document = html.page(f"tripletflow report{' ' + date if date else ''}", meta, sections)

    alerts_doc = {
        "alerts": found,
        "thresholds": limits.to_json(),
        "compared_with": [run_["date"] for run_ in history.runs] if history else [],
    }
    storage.write_text(storage.join(output_dir, contract.ALERTS_FILE), json.dumps(alerts_doc, indent=2) + "\n")
    storage.write_text(storage.join(output_dir, contract.REPORT_FILE), document)
    return found
