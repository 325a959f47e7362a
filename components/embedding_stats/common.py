"""What every EmbeddingStats stage shares: the metrics namespace, the dead-letter output, helpers."""

from __future__ import annotations

METRICS_NAMESPACE = "tripletflow.embedding_stats"
DEAD = "dead_letter"  # tag of dead-letter outputs


def dead_letter(source_file, reason, detail, example_id=None, raw=None) -> dict:
    """One `dead_letter` row (contract.DEAD_LETTER_SCHEMA)."""
    return {"source_file": source_file, "reason": reason, "detail": detail, "example_id": example_id, "raw": raw}


def in_global_window(value):
    """`value` as a windowed value, for outputs of a DoFn's finish_bundle (batch pipelines: global window)."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue

    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])
