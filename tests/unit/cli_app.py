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


@app.task
def add(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b}


_runs: list[int] = []


@app.task(retry=1)
async def flaky(n: int):
    """The first run fails after one value; its retry yields all ``n``."""
    _runs.append(1)
    for i in range(n):
        yield i
        if len(_runs) == 1:
            raise ValueError("first run fails")


@app.task(echo=True)
async def quits(self):
    yield "before"
    self.ctx.cancel("changed my mind")


@app.task
async def sleepy(seconds: float) -> str:
    import asyncio

    await asyncio.sleep(seconds)
    return "woke"


@app.task
def multiline() -> None:
    raise ValueError("first line\nsecond line")
