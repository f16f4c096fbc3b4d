"""A web service that runs long generator jobs and streams their values to the browser.

    POST   /jobs?n=20&delay=0.1&fail_at=-1   submit a job; {"uuid": ...}
    GET    /jobs/{uuid}/events               its values as Server-Sent Events, live
    DELETE /jobs/{uuid}                      cancel it
    GET    /jobs/{uuid}                      its status

Each value is one SSE event whose id is ``<task uuid>/<seq>``: a browser's EventSource
that reconnects sends it back as ``Last-Event-ID``, and the stream resumes right after
that value (``from_seq``), even across a retry (a ``retry`` event names the new task). The
last event is ``end`` with the task's status, error or cancel reason: a client closes its
EventSource on it (one that reconnects after the end gets 204, which stops EventSource).

    uvicorn --app-dir docs/examples web:api

On ``memory://`` (the default) the service runs the worker itself. With
``QTASKS_BROKER_URL=kafka://...`` it does too unless ``QTASKS_WEB_WORKER=0`` (then
``qtasks -A web:app run`` processes run the jobs).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import Response, StreamingResponse

from qtasks.asyncio import QueueTasks
from qtasks.exc import AppClosedError, TaskFailedError, TaskNotFoundError

app = QueueTasks(name="web")


@app.task
async def job(n: int, delay: float = 0.1, fail_at: int = -1) -> AsyncIterator[dict[str, int]]:
    """``n`` values, one every ``delay`` seconds; fails at value ``fail_at`` (if 0 or more)."""
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"failed at {i}")
        await asyncio.sleep(delay)
        yield {"i": i}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with app:  # connected now, everything closed when the service stops
        if os.environ.get("QTASKS_WEB_WORKER", "1") != "0":
            await app.start()
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/jobs")
async def submit(n: int = 20, delay: float = 0.1, fail_at: int = -1) -> dict[str, str]:
    handle = await app.add_task("job", n, delay, fail_at)
    return {"uuid": handle.uuid}


async def known(uuid: str) -> Any:
    """The job's latest status; 400 for what is not a task uuid, 404 for an unknown one."""
    try:
        task = await app.get(uuid)
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, str(exc)) from None
    if task is None:
        raise HTTPException(404, f"no job {uuid}")
    return task


@api.get("/jobs/{uuid}")
async def status(uuid: str) -> dict[str, Any]:
    task = await known(uuid)
    return {"uuid": task.uuid, "status": task.status, "values": task.yield_count, "retried_as": task.retry_child_uuid}


@api.delete("/jobs/{uuid}")
async def cancel(uuid: str) -> dict[str, bool]:
    await known(uuid)
    return {"cancelled": await app.cancel(uuid, "cancelled from the web")}


def event(data: Any, *, name: str | None = None, id: str | None = None) -> str:
    lines = [f"event: {name}"] if name else []
    if id is not None:
        lines.append(f"id: {id}")
    lines.append(f"data: {json.dumps(data)}")
    return "\n".join(lines) + "\n\n"


@api.get("/jobs/{uuid}/events", response_model=None)
async def events(uuid: str, last_event_id: str | None = Header(default=None)) -> StreamingResponse | Response:
    start, from_seq = uuid, 0
    if last_event_id:  # "<task uuid>/<seq>": go on right after that value
        task_uuid, _, seq = last_event_id.rpartition("/")
        if not task_uuid or not re.fullmatch(r"-?[0-9]{1,9}", seq):
            raise HTTPException(400, f"Last-Event-ID {last_event_id!r} is not <task uuid>/<seq>")
        start, from_seq = task_uuid, max(0, int(seq) + 1)
    task = await known(start)
    if last_event_id and task.is_finished and task.status != "retry" and from_seq >= task.yield_count:
        # Everything was sent: 204 tells a browser's EventSource to stop reconnecting.
        return Response(status_code=204)

    async def stream() -> AsyncIterator[str]:
        try:
            async for item in app.stream(start, from_seq=from_seq, meta=True):
                if item.retried_as is not None:
                    # A resume from here starts at the retry's first value.
                    yield event({"retried_as": item.retried_as}, name="retry", id=f"{item.retried_as}/-1")
                else:
                    yield event(item.value, id=f"{item.uuid}/{item.seq}")
            final = await app.wait(start)
        except (TaskNotFoundError, AppClosedError) as exc:  # expired, or the service is stopping
            yield event({"error": str(exc)}, name="end")
            return
        error = None
        if final.status == "error":
            failed = TaskFailedError.of(final)
            error = f"{failed.remote_type}: {failed.remote_message}" if failed.remote_message else failed.remote_type
        # The last event: a client closes its EventSource on it (a reconnect would get 204).
        yield event({"status": final.status, "error": error, "cancel_reason": final.cancel_reason}, name="end")

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
