"""Reads a trainer's metrics.json defensively: curves (per-epoch lists) and figure groups.

The layout is the trainer's (components/trainer/), so nothing here insists on exact keys:
* a curve is a list of numbers, or a list of per-epoch objects whose numeric fields become
  curves (e.g. `{"epochs": [{"loss": ..., "val_loss": ...}, ...]}`);
* a figure group is an object of scalars (e.g. `validation.baseline`, `validation.trained`);
  groups are shown side by side, one column each, one row per figure name.
Anything else (strings, options) is left out of the plots.
"""

from __future__ import annotations

from components.report.run_data import finite_or_none

MAX_DEPTH = 4  # nesting levels searched


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def extract(metrics: dict) -> tuple[dict[str, list], dict[str, dict]]:
    """(curves {path: [float|None]}, groups {path: {name: number|None}}) found in `metrics`."""
    curves: dict[str, list] = {}
    groups: dict[str, dict] = {}

    def walk(value, path, depth):
        if depth > MAX_DEPTH:
            return
        if isinstance(value, list) and value:
            if all(_is_number(item) or item is None for item in value):
                curves[path or "value"] = [finite_or_none(item) for item in value]
            elif all(isinstance(item, dict) for item in value):
                names = sorted({k for item in value for k, v in item.items() if _is_number(v)})
                for name in names:
                    curves[f"{path}.{name}" if path else name] = [finite_or_none(item.get(name)) for item in value]
        elif isinstance(value, dict):
            scalars = {k: finite_or_none(v) for k, v in value.items() if _is_number(v) or v is None}
            if scalars:
                groups[path or "metrics"] = scalars
            for key, item in value.items():
                if isinstance(item, (dict, list)):
                    walk(item, f"{path}.{key}" if path else str(key), depth + 1)

    walk(metrics, "", 0)
    return curves, groups


def is_loss_curve(name: str) -> bool:
    return "loss" in name.lower()
