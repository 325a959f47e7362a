"""Alert thresholds and the checks that compare a run (and its history) against them.

An alert is a plain dict, as written to alerts.json:
`{"name", "value", "threshold", "basis", "message"}`; `name` is one of ALERT_NAMES, `basis`
says what the value was compared with ("this run", "previous run 2026-11-27", "trailing mean
of 7 runs").  Checks whose inputs are undefined (no records, no pairs, no history) do not
fire, except `no_records`: a night that read nothing is itself a failure.
"""

from __future__ import annotations

import dataclasses
import math

from components.report.run_data import finite_or_none

# Defaults of the thresholds (see Thresholds for their meaning).
DEFAULT_MAX_REJECTION_RATE = 0.05
DEFAULT_MAX_EMPTY_FRACTION = 0.2
DEFAULT_MIN_AUC = 0.6
DEFAULT_MAX_AUC_DROP = 0.05
DEFAULT_TRAILING_RUNS = 7
DEFAULT_MIN_MEAN_NORM = 1e-3
DEFAULT_MAX_MEAN_NORM = 1e3
DEFAULT_MAX_NORM_RATIO = 10.0
DEFAULT_MIN_NEG_DISTANCE_FRACTION = 0.05

ALERT_NAMES = (
    "no_records",
    "rejection_rate",
    "empty_fraction",
    "auc_low",
    "auc_drop_previous",
    "auc_drop_trailing",
    "norm_collapse",
    "norm_explosion",
    "direction_collapse",
)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Configurable limits; `--threshold NAME=VALUE` overrides one by its field name."""

    max_rejection_rate: float = DEFAULT_MAX_REJECTION_RATE  # rejected / read records
    max_empty_fraction: float = DEFAULT_MAX_EMPTY_FRACTION  # examples with no valid box / examples
    min_auc: float = DEFAULT_MIN_AUC  # ROC AUC of positive vs negative pair distances
    max_auc_drop: float = DEFAULT_MAX_AUC_DROP  # AUC points lost vs previous run or trailing mean
    trailing_runs: int = DEFAULT_TRAILING_RUNS  # earlier runs in the trailing mean
    min_mean_norm: float = DEFAULT_MIN_MEAN_NORM  # mean raw L2 norm below this: norms collapsed
    max_mean_norm: float = DEFAULT_MAX_MEAN_NORM  # mean raw L2 norm above this: norms exploded
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO  # mean norm vs trailing mean, either way
    # mean negative-pair distance / histogram range below this: vectors share one direction
    min_neg_distance_fraction: float = DEFAULT_MIN_NEG_DISTANCE_FRACTION

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "trailing_runs":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"threshold trailing_runs must be an integer >= 1, got {value!r}")
            elif (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"threshold {field.name} must be a finite number >= 0, got {value!r}")
        if self.max_norm_ratio < 1:
            raise ValueError(f"threshold max_norm_ratio must be >= 1, got {self.max_norm_ratio}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def threshold_names() -> list[str]:
    return [field.name for field in dataclasses.fields(Thresholds)]


def parse_overrides(pairs, base: Thresholds = Thresholds()) -> Thresholds:
    """Applies ["NAME=VALUE", ...] to `base`; raises ValueError on an unknown name or bad value."""
    changes = {}
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in threshold_names():
            raise ValueError(f"--threshold must be NAME=VALUE with NAME one of {threshold_names()}, got {pair!r}")
        try:
            changes[name] = int(text) if name == "trailing_runs" else float(text)
        except ValueError:
            raise ValueError(f"--threshold {name}: {text!r} is not a number") from None
    return dataclasses.replace(base, **changes)


def as_thresholds(value) -> Thresholds:
    """Thresholds from None (defaults), a Thresholds, a {name: value} dict or ["NAME=VALUE"] list."""
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(threshold_names()))
        if unknown:
            raise ValueError(f"unknown thresholds {unknown}; known: {threshold_names()}")
        return dataclasses.replace(Thresholds(), **value)
    return parse_overrides(value)


def _alert(name, value, threshold, basis, message) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "basis": basis, "message": message}


def run_figures(summary: dict, mean_neg_distance: float | None) -> dict:
    """The figures of one run the checks and the trend plots use (None where undefined)."""
    read = summary.get("records_read") or 0
    examples = summary.get("examples") or 0
    edges = (summary.get("histogram") or {}).get("bin_edges") or []
    distance_range = finite_or_none(edges[-1]) if edges else None
    return {
        "records_read": read,
        "rejection_rate": (summary.get("records_rejected") or 0) / read if read else None,
        "empty_fraction": (summary.get("empty_examples") or 0) / examples if examples else None,
        "roc_auc": finite_or_none(summary.get("roc_auc")),
        "mean_norm": finite_or_none((summary.get("l2_norm") or {}).get("mean")),
        "mean_batch_all_loss": finite_or_none(summary.get("mean_batch_all_loss")),
        "mean_batch_hard_loss": finite_or_none(summary.get("mean_batch_hard_loss")),
        "mean_semi_hard_loss": finite_or_none(summary.get("mean_semi_hard_loss")),
        "neg_distance_fraction": (
            mean_neg_distance / distance_range if mean_neg_distance is not None and distance_range else None
        ),
    }


def check(current: dict, history: list[dict], thresholds: Thresholds) -> list[dict]:
    """Alerts for one run's figures (`run_figures`) against thresholds and earlier runs.

    `history` holds earlier runs' figures, oldest first, each with a "date" key.
    """
    t = thresholds
    alerts = []
    if not current["records_read"]:
        alerts.append(_alert("no_records", 0, None, "this run", "the run read no records at all"))
    rate = current["rejection_rate"]
    if rate is not None and rate > t.max_rejection_rate:
        alerts.append(
            _alert(
                "rejection_rate",
                rate,
                t.max_rejection_rate,
                "this run",
                f"{rate:.1%} of records were rejected (limit {t.max_rejection_rate:.1%})",
            )
        )
    empty = current["empty_fraction"]
    if empty is not None and empty > t.max_empty_fraction:
        alerts.append(
            _alert(
                "empty_fraction",
                empty,
                t.max_empty_fraction,
                "this run",
                f"{empty:.1%} of examples have no valid box (limit {t.max_empty_fraction:.1%})",
            )
        )
    auc = current["roc_auc"]
    if auc is not None and auc < t.min_auc:
        alerts.append(
            _alert(
                "auc_low",
                auc,
                t.min_auc,
                "this run",
                f"ROC AUC {auc:.4f} is below {t.min_auc:.4f}: positive and negative pairs are hardly separated",
            )
        )
    earlier_auc = [(run["date"], run["roc_auc"]) for run in history if run.get("roc_auc") is not None]
    if auc is not None and earlier_auc:
        date, previous = earlier_auc[-1]
        if previous - auc > t.max_auc_drop:
            alerts.append(
                _alert(
                    "auc_drop_previous",
                    previous - auc,
                    t.max_auc_drop,
                    f"previous run {date}",
                    f"ROC AUC fell by {previous - auc:.4f} from {previous:.4f} on {date} "
                    f"to {auc:.4f} (limit {t.max_auc_drop:.4f})",
                )
            )
        window = [value for _, value in earlier_auc[-t.trailing_runs :]]
        trailing = sum(window) / len(window)
        if trailing - auc > t.max_auc_drop:
            alerts.append(
                _alert(
                    "auc_drop_trailing",
                    trailing - auc,
                    t.max_auc_drop,
                    f"trailing mean of {len(window)} runs",
                    f"ROC AUC {auc:.4f} is {trailing - auc:.4f} below the trailing mean "
                    f"{trailing:.4f} of {len(window)} earlier runs (limit {t.max_auc_drop:.4f})",
                )
            )
    norm = current["mean_norm"]
    if norm is not None:
        if norm < t.min_mean_norm:
            alerts.append(
                _alert(
                    "norm_collapse",
                    norm,
                    t.min_mean_norm,
                    "this run",
                    f"mean L2 norm {norm:.4g} is below {t.min_mean_norm:.4g}",
                )
            )
        if norm > t.max_mean_norm:
            alerts.append(
                _alert(
                    "norm_explosion",
                    norm,
                    t.max_mean_norm,
                    "this run",
                    f"mean L2 norm {norm:.4g} is above {t.max_mean_norm:.4g}",
                )
            )
        window = [run["mean_norm"] for run in history if run.get("mean_norm")][-t.trailing_runs :]
        if window:
            trailing = sum(window) / len(window)
            basis = f"trailing mean of {len(window)} runs"
            if norm * t.max_norm_ratio < trailing:
                alerts.append(
                    _alert(
                        "norm_collapse",
                        norm / trailing,
                        1 / t.max_norm_ratio,
                        basis,
                        f"mean L2 norm {norm:.4g} is {trailing / norm if norm else math.inf:.3g}x "
                        f"below the trailing mean {trailing:.4g} (limit {t.max_norm_ratio:g}x)",
                    )
                )
            if norm > trailing * t.max_norm_ratio:
                alerts.append(
                    _alert(
                        "norm_explosion",
                        norm / trailing,
                        t.max_norm_ratio,
                        basis,
                        f"mean L2 norm {norm:.4g} is {norm / trailing:.3g}x the trailing mean "
                        f"{trailing:.4g} (limit {t.max_norm_ratio:g}x)",
                    )
                )
    spread = current["neg_distance_fraction"]
    if spread is not None and spread < t.min_neg_distance_fraction:
        alerts.append(
            _alert(
                "direction_collapse",
                spread,
                t.min_neg_distance_fraction,
                "this run",
                f"negative pairs lie {spread:.2%} of the distance range apart on average "
                f"(limit {t.min_neg_distance_fraction:.2%}): the vectors share one direction",
            )
        )
    return alerts
