"""Reads a trainer's metrics.json (components/trainer/executor.py) defensively.

Layout used: `epochs` (a list of per-epoch objects, e.g. `{"epoch", "loss", "seconds", ...}`),
`validation` (objects of scalar figures per head, e.g. `baseline` and `trained`), `status`.
Missing or malformed parts are simply left out of the report, never fatal: a report must
not fail because a model beside the run is odd.
"""

from __future__ import annotations

from components.report.run_data import finite_or_none

EPOCHS_KEY = "epochs"
VALIDATION_KEY = "validation"
STATUS_KEY = "status"
LOSS_MARK = "loss"  # per-epoch fields whose name holds this are plotted as loss curves
BASELINE, TRAINED = "baseline", "trained"
# validation figures listed first, in this order; the others follow alphabetically
LEADING_FIGURES = ("roc_auc", "recall_at_1", "mean_batch_all_loss", "mean_batch_hard_loss", "mean_semi_hard_loss")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value):
    """Ints stay ints (counts), other numbers become finite floats or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return finite_or_none(value)


def loss_curves(metrics: dict) -> dict[str, list]:
    """{field: [value per epoch]} of the numeric per-epoch fields named like a loss."""
    epochs = metrics.get(EPOCHS_KEY)
    if not isinstance(epochs, list):
        return {}
    epochs = [item for item in epochs if isinstance(item, dict)]
    names = sorted({k for item in epochs for k, v in item.items() if LOSS_MARK in k.lower() and _is_number(v)})
    return {name: [finite_or_none(item.get(name)) for item in epochs] for name in names}


def validation_groups(metrics: dict) -> dict[str, dict]:
    """{head: {figure: number or None}} from `validation`, baseline first, then trained, then others."""
    validation = metrics.get(VALIDATION_KEY)
    if not isinstance(validation, dict):
        return {}
    groups = {}
    for head, figures in validation.items():
        if isinstance(figures, dict):
            names = [n for n in LEADING_FIGURES if n in figures] + sorted(
                n for n in figures if n not in LEADING_FIGURES
            )
            groups[head] = {n: _scalar(figures[n]) for n in names if _is_number(figures[n]) or figures[n] is None}
    order = [h for h in (BASELINE, TRAINED) if h in groups] + sorted(h for h in groups if h not in (BASELINE, TRAINED))
    return {head: groups[head] for head in order}


def status(metrics: dict) -> str | None:
    value = metrics.get(STATUS_KEY)
    return value if isinstance(value, str) else None
