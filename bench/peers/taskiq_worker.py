"""The Taskiq peer (taskiq + taskiq-aio-kafka): an AioKafkaBroker and its worker.

Run by bench/bench_peers.py as ``python -m taskiq worker taskiq_worker:broker --workers 1
--max-async-tasks C`` (the Taskiq CLI: a supervising process and one worker process).
The broker is configured as taskiq-aio-kafka's README shows (``configure_consumer`` with
a group id; ``auto_offset_reset="earliest"`` so that the worker reads the backlog that
was kicked before it started). Everything else is the defaults: aiokafka's auto-commit
(the broker's ``listen`` yields bare values, which a Taskiq receiver cannot acknowledge),
``acks=1``, ``send_and_wait`` for each kicked message.

Taskiq keeps a task's return value in its result backend, and no result backend writes
to Kafka, so:

- short: ``short()`` returns its value and a minimal result backend (``KafkaResults``
  below, Taskiq's extension point ``AsyncResultBackend``) writes it as one record to the
  results topic with the broker's own producer (``send_and_wait``), keyed by the task id.
  The receiver awaits ``set_result`` for each task, so this is Taskiq's own result path.
- generator: a Taskiq task has one return value (no generator tasks); the closest
  honest equivalent is a task that sends its k values itself with the broker's producer
  (queued one by one, all deliveries awaited before it returns), with the default
  result backend (which drops the return value).
"""

import json
from typing import Annotated, Any

from taskiq import AsyncResultBackend, Context, TaskiqDepends, TaskiqResult
from taskiq_aio_kafka import AioKafkaBroker
from worker_env import BOOTSTRAP, GROUP, RESULTS_TOPIC, TASKS_TOPIC, WORKLOAD, result_value


class KafkaResults(AsyncResultBackend[Any]):
    """Writes each task's result as a record to the results topic (write only)."""

    broker: AioKafkaBroker

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        value = {"uuid": task_id, "seq": 0, "value": result.return_value, "is_err": result.is_err}
        await self.broker._aiokafka_producer.send_and_wait(
            RESULTS_TOPIC, json.dumps(value).encode(), key=task_id.encode()
        )

    async def is_result_ready(self, task_id: str) -> bool:
        raise NotImplementedError("the results are read from the results topic")

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        raise NotImplementedError("the results are read from the results topic")


broker = AioKafkaBroker(bootstrap_servers=BOOTSTRAP, kafka_topic=TASKS_TOPIC)
broker.configure_consumer(group_id=GROUP, auto_offset_reset="earliest")
if WORKLOAD == "short":
    backend = KafkaResults()
    backend.broker = broker
    broker = broker.with_result_backend(backend)


@broker.task(task_name="bench_short")
async def short() -> int:
    return 0


@broker.task(task_name="bench_gen")
async def gen(k: int, context: Annotated[Context, TaskiqDepends()]) -> None:
    task_id = context.message.task_id
    key = task_id.encode()
    producer = context.broker._aiokafka_producer
    deliveries = [
        await producer.send(RESULTS_TOPIC, json.dumps(result_value(task_id, i)).encode(), key=key) for i in range(k)
    ]
    for delivery in deliveries:
        await delivery
