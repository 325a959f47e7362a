"""Test-only fault injection into Beam worker processes (issue #7), kept out of production code.

A worker started with `tests/faults` on PYTHONPATH and KILL_WORKER_ONCE_ENV naming a marker
file imports this at start-up: the pair-statistics DoFn is wrapped so that the first worker to
process a batch creates the marker and dies at once (os._exit), as a preempted or OOM-killed
worker would. Later batches, and later runs with the marker there, run clean.
"""

import os

KILL_WORKER_ONCE_ENV = "TRIPLETFLOW_TEST_KILL_WORKER_ONCE"
KILLED_WORKER_EXIT_CODE = 17


def _install(marker: str) -> None:
    import functools

    from components.embedding_stats import statistics

    process = statistics._PairStatisticsFn.process

    @functools.wraps(process)
    def process_or_die(self, batch, *side_inputs):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            yield from process(self, batch, *side_inputs)
            return
        os.close(fd)
        os._exit(KILLED_WORKER_EXIT_CODE)

    statistics._PairStatisticsFn.process = process_or_die


if os.environ.get(KILL_WORKER_ONCE_ENV):
    _install(os.environ[KILL_WORKER_ONCE_ENV])
