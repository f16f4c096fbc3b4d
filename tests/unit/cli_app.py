"""An app for the CLI tests."""

from qtasks.asyncio import QueueTasks

app = QueueTasks(name="cli_demo")


@app.task
async def count(n: int, label: str = "v"):
    for i in range(n):
        yield f"{label}{i}"


@app.task
def fail() -> None:
    raise RuntimeError("it broke")
