"""The FastStream peer (faststream[kafka]): a subscriber on the tasks topic that publishes its results.

Run by bench/bench_peers.py as ``python faststream_worker.py`` (``asyncio.run(app.run())``,
FastStream's way to run an app without its CLI extra; SIGINT/SIGTERM stop it gracefully).
The subscriber keeps FastStream's default acknowledgement (``AckPolicy.ACK_FIRST``:
aiokafka's auto-commit) and gets ``max_workers`` = the concurrency every engine gets.

- short: the idiomatic form, a handler whose return value the ``@broker.publisher``
  decorator publishes (as a ``KafkaResponse`` to set the record key).
- generator: a handler cannot stream a return value, so it publishes each value as it
  computes it through a publisher object with ``no_confirm=True`` (the send is queued,
  not awaited), then awaits all k confirmations before it returns, as the raw loop
  awaits its deliveries.
"""

import asyncio
import logging
from typing import Any

from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaResponse
from worker_env import BOOTSTRAP, CONCURRENCY, GROUP, RESULTS_TOPIC, TASKS_TOPIC, WORKLOAD, result_value

# log_level: FastStream logs every message received and processed at this level; DEBUG
# keeps those lines out (its logger shows INFO and up), as the other workers log warnings only.
broker = KafkaBroker(BOOTSTRAP, log_level=logging.DEBUG)
app = FastStream(broker)
subscriber = broker.subscriber(TASKS_TOPIC, group_id=GROUP, auto_offset_reset="earliest", max_workers=CONCURRENCY)

if WORKLOAD == "generator":
    results = broker.publisher(RESULTS_TOPIC)

    @subscriber
    async def run_task(task: dict[str, Any]) -> None:
        key = task["uuid"].encode()
        confirms = [
            await results.publish(result_value(task["uuid"], i), key=key, no_confirm=True) for i in range(task["k"])
        ]
        for confirm in confirms:
            await confirm

else:

    @subscriber
    @broker.publisher(RESULTS_TOPIC)
    async def run_task(task: dict[str, Any]) -> KafkaResponse:
        return KafkaResponse(result_value(task["uuid"], 0), key=task["uuid"].encode())


if __name__ == "__main__":
    asyncio.run(app.run())
