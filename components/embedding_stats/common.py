"""Names every EmbeddingStats stage shares: the metrics namespace and the dead-letter output."""

from __future__ import annotations

METRICS_NAMESPACE = "tripletflow.embedding_stats"
DEAD = "dead_letter"  # tag of dead-letter outputs


def dead_letter(source_file, reason, detail, example_id=None, raw=None) -> dict:
    """One `dead_letter` row (contract.DEAD_LETTER_SCHEMA)."""
    return {"source_file": source_file, "reason": reason, "detail": detail, "example_id": example_id, "raw": raw}
