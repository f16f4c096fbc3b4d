"""What bench/bench_peers.py tells a peer's worker process, through its environment.

Every peer reads its tasks from ``BENCH_TASKS_TOPIC`` (a task is ``{"uuid": ..., "k": k}``
in the peer's own message format) and writes each value as one record to
``BENCH_RESULTS_TOPIC``: key the task's id, value ``{"uuid", "seq", "value"}`` as JSON,
the same record as the raw loop of bench/bench_kafka.py writes.
"""

from __future__ import annotations

import os

BOOTSTRAP = os.environ["BENCH_BOOTSTRAP"]
TASKS_TOPIC = os.environ["BENCH_TASKS_TOPIC"]
RESULTS_TOPIC = os.environ["BENCH_RESULTS_TOPIC"]
GROUP = os.environ["BENCH_GROUP"]  # the consumer group (Faust: the app id)
WORKLOAD = os.environ["BENCH_WORKLOAD"]  # "generator" (k values per task) or "short" (1 value)
CONCURRENCY = int(os.environ["BENCH_CONCURRENCY"])  # tasks in flight, where the engine has the knob
DATA_DIR = os.environ["BENCH_DATA_DIR"]  # a scratch directory of this run (Faust's datadir)


def result_value(task_uuid: str, seq: int) -> dict[str, object]:
    """The value of a result record (the raw loop's shape)."""
    return {"uuid": task_uuid, "seq": seq, "value": seq}
