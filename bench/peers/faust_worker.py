"""The Faust peer (faust-streaming): an agent over the tasks topic that sends each value to the results topic.

Run by bench/bench_peers.py as ``python faust_worker.py worker --without-web -l warn``
(``app.main()``, the Faust CLI in-process, as its docs start a worker). A stream
processor emits any number of records per input event, so the generator workload is
native here: the agent sends the k values of a task one by one as it computes them.
``topic.send`` hands a record to Faust's producer and does not wait for the broker's
acknowledgement (Faust flushes its producer before it commits the source offsets).
Everything else is Faust's defaults, except the agent's ``concurrency`` (the same
figure every engine gets) and no web server (no port to collide with).
"""

import faust
from worker_env import BOOTSTRAP, CONCURRENCY, DATA_DIR, GROUP, RESULTS_TOPIC, TASKS_TOPIC, result_value

app = faust.App(
    GROUP,  # the app id, which is also the consumer group
    broker=f"kafka://{BOOTSTRAP}",
    value_serializer="json",
    datadir=DATA_DIR,
    web_enabled=False,
)
tasks = app.topic(TASKS_TOPIC, key_type=bytes, value_serializer="json")
results = app.topic(RESULTS_TOPIC, key_type=bytes, value_serializer="json")


@app.agent(tasks, concurrency=CONCURRENCY)
async def run_tasks(stream):
    async for task in stream:
        key = task["uuid"].encode()
        for i in range(task["k"]):
            await results.send(key=key, value=result_value(task["uuid"], i))


if __name__ == "__main__":
    app.main()
