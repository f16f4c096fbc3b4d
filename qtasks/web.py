"""The dashboard: ``qtasks -A module:app web [--port P]``.

A web page over what the group's log holds: the workers and their partitions, running
tasks with their progress, recent tasks filtered by status and name, a task page that
streams the task's values live (Server-Sent Events) and shows how it ended, the
dead-letter topic with replay, a form to submit a task and a button to cancel one.

It reads everything from Kafka (the status table, the results, the group's coordinator)
through an app client of its own: it asks no worker anything, works with any number of
them, and never slows one down. Built on Starlette (the ASGI toolkit under FastAPI: small,
well kept, streaming responses without extra parts) and served by uvicorn; both come
with the ``web`` extra (``pip install 'qtasks-kafka[web]'``). The pages are plain HTML
with a little JavaScript (``fetch`` and ``EventSource``): nothing to build.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qtasks import ops
from qtasks.bulk import Args
from qtasks.exc import AppClosedError, ConnectorError, StreamIncompleteError, TaskNotFoundError
from qtasks.validate import check_uuid

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

__all__ = ["create_app", "serve"]

#: An SSE comment this often keeps proxies from closing a quiet stream (seconds).
KEEP_ALIVE = 15.0
#: The group's description is shared by every page for this long (seconds): one
#: DescribeGroups per interval, however many browsers look.
GROUP_CACHE = 1.0
#: An answer begins within this long (seconds), or the request gets a 504.
REQUEST_TIMEOUT = 30.0
#: uvicorn's connection limit: it answers 503 once this many are open, counting the one
#: asking (so one fewer are served). Each open task page holds one.
MAX_CONNECTIONS = 200
#: How long a stopping dashboard waits for its open requests (its event streams end at once).
SHUTDOWN_TIMEOUT = 5


def _data(value: Any) -> Any:
    return msgspec.to_builtins(value)


class _Dashboard:
    def __init__(self, app: QueueTasks) -> None:
        self.app = app
        self._group: tuple[float, dict[str, Any]] | None = None
        self._group_lock = asyncio.Lock()
        #: Set as the server stops: open event streams end (a browser's EventSource reconnects
        #: to the next dashboard, from its last value) instead of being cancelled.
        self.closing = asyncio.Event()

    # -- JSON ------------------------------------------------------------------------

    async def group(self, request: Request) -> Response:
        async with self._group_lock:
            if self._group is None or time.monotonic() - self._group[0] > GROUP_CACHE:
                report = await ops.inspect_group(self.app)
                self._group = (time.monotonic(), report.to_dict())
            return JSONResponse(self._group[1])

    async def tasks(self, request: Request) -> Response:
        params = request.query_params
        try:
            limit = min(int(params.get("limit", "50")), 1000)
        except ValueError:
            return JSONResponse({"error": "limit must be a number"}, status_code=400)
        found = await ops.list_tasks(
            self.app, status=params.get("status") or None, name=params.get("name") or None, limit=limit
        )
        return JSONResponse([_data(t) for t in found])

    async def task(self, request: Request) -> Response:
        uuid = _uuid(request)
        if uuid is None:
            return JSONResponse({"error": "not a task uuid"}, status_code=404)
        task = await self.app.get(uuid)
        if task is None:
            return JSONResponse({"error": f"no task {uuid}"}, status_code=404)
        return JSONResponse(_data(task))

    async def submit(self, request: Request) -> Response:
        try:
            body = await request.json()
            name = body["name"]
            args = body.get("args") or []
            kwargs = body.get("kwargs") or {}
            if not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError("name is text, args a list, kwargs an object")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
            return JSONResponse({"error": f"a task is {{name, args, kwargs}}: {exc}"}, status_code=400)
        try:
            # add_tasks takes the task's own arguments whatever their names (add_task keeps
            # timeout= and priority= for itself).
            [task] = await self.app.add_tasks(name, [Args(*args, **kwargs)])
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"uuid": task.uuid}, status_code=201)

    async def cancel(self, request: Request) -> Response:
        uuid = _uuid(request)
        if uuid is None:
            return JSONResponse({"error": "not a task uuid"}, status_code=404)
        reason = request.query_params.get("reason", "") or "cancelled from the dashboard"
        done = await self.app.cancel(uuid, reason)
        return JSONResponse({"uuid": uuid, "cancelled": done}, status_code=200 if done else 409)

    async def events(self, request: Request) -> Response:
        """The task's values as Server-Sent Events (``value``), then ``end`` with its final status."""
        uuid = _uuid(request)
        if uuid is None:
            return JSONResponse({"error": "not a task uuid"}, status_code=404)
        from_seq = 0
        if last := request.headers.get("last-event-id"):
            # A browser's EventSource reconnecting: go on right after "<task uuid>/<seq>" (a
            # retry's task, if the stream had moved on to it).
            task_uuid, _, seq = last.rpartition("/")
            try:
                uuid, from_seq = check_uuid(task_uuid), max(0, int(seq) + 1)
            except (TypeError, ValueError):
                return JSONResponse({"error": f"Last-Event-ID {last!r} is not <task uuid>/<seq>"}, status_code=400)
            task = await self.app.get(uuid)
            if task is not None and task.is_finished and task.status != "retry" and from_seq >= task.yield_count:
                return Response(status_code=204)  # all sent: a 204 stops the EventSource
        return StreamingResponse(
            self._events(uuid, from_seq),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, uuid: str, from_seq: int = 0) -> AsyncIterator[str]:
        app = self.app
        items = app.stream(uuid, from_seq=from_seq, meta=True).__aiter__()
        step: asyncio.Future[Any] | None = None
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                step = asyncio.ensure_future(items.__anext__())
                while True:
                    done, _ = await asyncio.wait([step, closing], timeout=KEEP_ALIVE, return_when=FIRST_COMPLETED)
                    if closing in done:
                        return  # the server stops
                    if done:
                        break
                    yield ": keep-alive\n\n"
                try:
                    item = step.result()
                except StopAsyncIteration:
                    break
                if item.retried_as is not None:
                    yield _sse("retry", {"uuid": item.uuid, "retried_as": item.retried_as}, f"{item.retried_as}/-1")
                    continue
                yield _sse(
                    "value",
                    {"uuid": item.uuid, "seq": item.seq, "attempt": item.attempt, "value": item.value},
                    f"{item.uuid}/{item.seq}",
                )
            final = await app.wait(uuid)
            yield _sse("end", _data(final))
        except (TaskNotFoundError, StreamIncompleteError) as exc:
            yield _sse("error", {"error": str(exc)})
        except AppClosedError:
            return
        finally:
            closing.cancel()
            # The browser went away (or the stream ended): stop reading its results.
            if step is not None and not step.done():
                step.cancel()
                await asyncio.wait([step])
            with contextlib.suppress(Exception):
                await items.aclose()  # type: ignore[attr-defined]

    async def letters(self, request: Request) -> Response:
        return JSONResponse([letter.to_dict(value=True) for letter in await ops.dead_letters(self.app)])

    async def replay(self, request: Request) -> Response:
        letters = await ops.dead_letters(self.app)
        number = request.path_params.get("number")
        chosen = letters if number is None else [letter for letter in letters if letter.offset == int(number)]
        if number is not None and not chosen:
            return JSONResponse({"error": f"no dead letter {number}"}, status_code=404)
        results = await ops.replay(self.app, chosen)
        return JSONResponse([{"number": r.letter.offset, "uuid": r.uuid, "refused": r.refused} for r in results])

    # -- pages -----------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        names = "".join(f"<option>{html.escape(n)}</option>" for n in self.app.registry.names())
        return _page("Overview", OVERVIEW.replace("{names}", names))

    async def tasks_page(self, request: Request) -> Response:
        return _page("Tasks", TASKS)

    async def task_page(self, request: Request) -> Response:
        uuid = _uuid(request)
        if uuid is None:
            return _page("No such task", "<p>That is not a task uuid.</p>", status=404)
        # Any non-empty text names a task (a foreign producer's record may): escaped for HTML and for the script.
        page = TASK.replace("__UUID_HTML__", html.escape(uuid)).replace("__UUID_JS__", _js_string(uuid))
        return _page(f"Task {uuid}", page)

    async def dlq_page(self, request: Request) -> Response:
        return _page("Dead letters", DLQ)


def _uuid(request: Request) -> str | None:
    try:
        return check_uuid(request.path_params["uuid"])
    except (TypeError, ValueError):
        return None


def _js_string(text: str) -> str:
    """``text`` as a JavaScript string literal that is safe inside a ``<script>`` element."""
    return json.dumps(text).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sse(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


class _SameOrigin:
    """Refuse what another site could make a browser send: a request whose ``Host`` is not
    one the dashboard is served as (DNS rebinding), and a POST from another origin (a form
    on another site needs no preflight). A POST with a body must say it is JSON."""

    def __init__(self, app: Any, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self._problem(scope)
            if problem is not None:
                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Any) -> str | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = _host_name(host)
        if self.allowed is not None and "*" not in self.allowed and name not in self.allowed:
            return f"this dashboard is not served as {host!r} (qtasks web --allow-host {name} to allow it)"
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origin = headers.get("origin")
        if origin is not None and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
            return "a request from another site"
        if origin == "null" or headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "a request from another site"
        if headers.get("content-length", "0") not in ("", "0") and not headers.get("content-type", "").startswith(
            "application/json"
        ):
            return "a request body must be JSON (Content-Type: application/json)"
        return None


class _TooLarge(Exception):
    pass


class _Bounded:
    """What one request may cost: a body of at most ``max_body`` bytes (413 past it, counted as
    it arrives whatever its ``Content-Length`` says), and an answer begun within ``timeout``
    seconds (504 past it: the broker may be away). Once begun, an answer is not cut: an event
    stream lasts as long as its task. A broker that is away is a 503."""

    def __init__(self, app: Any, max_body: int, timeout: float) -> None:
        self.app = app
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"a request body is at most {self.max_body} bytes"
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._refuse(413, too_large, scope, receive, send, close=True)
            return
        received = 0
        started = False
        bound = asyncio.timeout(self.timeout)

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge()
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                bound.reschedule(None)  # answered: the body (an event stream's too) takes its time
            await send(message)

        try:
            async with bound:
                await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(413, too_large, scope, receive, send, close=True)
        except TimeoutError:
            if started or not bound.expired():
                raise  # not this bound's: the handler's own
            problem = f"no answer within {self.timeout:g} s: the broker may be away"
            if scope["method"] == "POST":
                problem += " (what was asked may still be done: look before asking again)"
            await self._refuse(504, problem, scope, receive, send)
        except ConnectorError as exc:
            if started or not exc.retriable:
                raise
            await self._refuse(503, f"the broker is away: {exc}", scope, receive, send)

    @staticmethod
    async def _refuse(status: int, problem: str, scope: Any, receive: Any, send: Any, close: bool = False) -> None:
        # A body past the limit is not read on: the connection is closed after the answer.
        headers = {"connection": "close"} if close else None
        await JSONResponse({"error": problem}, status_code=status, headers=headers)(scope, receive, send)


def _host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower()


def create_app(
    app: QueueTasks,
    allowed_hosts: list[str] | None = None,
    *,
    max_body: int | None = None,
    request_timeout: float = REQUEST_TIMEOUT,
) -> Starlette:
    """The dashboard of ``app`` as an ASGI application (it disconnects the app on shutdown).

    ``allowed_hosts``: the names it answers to (the ``Host`` header); None: any. POSTs
    from other origins are refused either way. ``max_body``: the largest request body
    (default: the app's ``max_record_bytes``, the largest task record it sends);
    ``request_timeout``: how long an answer may take to begin (504 past it).
    """
    dashboard = _Dashboard(app)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await app.close()

    site = Starlette(
        routes=[
            Route("/", dashboard.overview),
            Route("/tasks", dashboard.tasks_page),
            Route("/tasks/{uuid}", dashboard.task_page),
            Route("/dlq", dashboard.dlq_page),
            Route("/api/group", dashboard.group),
            Route("/api/tasks", dashboard.tasks),
            Route("/api/tasks", dashboard.submit, methods=["POST"]),
            Route("/api/tasks/{uuid}", dashboard.task),
            Route("/api/tasks/{uuid}/cancel", dashboard.cancel, methods=["POST"]),
            Route("/api/tasks/{uuid}/events", dashboard.events),
            Route("/api/dlq", dashboard.letters),
            Route("/api/dlq/replay", dashboard.replay, methods=["POST"]),
            Route("/api/dlq/{number:int}/replay", dashboard.replay, methods=["POST"]),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(_SameOrigin, allowed_hosts=allowed_hosts),
            Middleware(
                _Bounded,
                max_body=app.config.max_record_bytes if max_body is None else max_body,
                timeout=request_timeout,
            ),
        ],
    )
    site.state.dashboard = dashboard
    return site


#: The names a dashboard on a loopback address answers to.
LOOPBACK = ["127.0.0.1", "localhost", "::1"]


async def serve(app: QueueTasks, host: str = "127.0.0.1", port: int = 8000, allow_hosts: Sequence[str] = ()) -> None:
    """Serve the dashboard until SIGINT or SIGTERM.

    On a loopback address it answers to loopback names only (and ``allow_hosts``); on
    another address, to that address and ``allow_hosts`` (``*``: any name).
    """
    if host in ("0.0.0.0", "::", ""):
        allowed = [*allow_hosts] if allow_hosts else ["*"]
    else:
        allowed = [*LOOPBACK, host, *allow_hosts]
    server = _server(app, host, port, allowed)
    print(f"qtasks dashboard of {app.name} on http://{host}:{port}/", flush=True)
    await server.serve()


def _server(app: QueueTasks, host: str, port: int, allowed: list[str]) -> Any:
    """The uvicorn server of the dashboard: bounded in connections, and in how long it waits
    for open requests when it stops."""
    import uvicorn

    site = create_app(app, allowed)
    dashboard: _Dashboard = site.state.dashboard

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            dashboard.closing.set()  # the open event streams end, and their connections with them
            await super().shutdown(sockets)

    config = uvicorn.Config(
        site,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
    )
    return Server(config)


# -- the pages ---------------------------------------------------------------------------


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    # Put together in one pass: a title or body that holds "{body}" stays as it is.
    before_title, rest = LAYOUT.split("{title}")
    before_body, after_body = rest.split("{body}")
    return HTMLResponse(before_title + html.escape(title) + before_body + body + after_body, status_code=status)


LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · qtasks</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 10px 24px; display: flex; gap: 24px; align-items: baseline; }
header a { color: #cfd6e4; text-decoration: none; } header a:hover { color: #fff; }
header strong { font-size: 16px; }
main { padding: 16px 24px; max-width: 1200px; }
h1 { font-size: 20px; margin: 8px 0 16px; } h2 { font-size: 16px; margin: 24px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e3e6ec; vertical-align: top; }
th { background: #eef0f4; font-weight: 600; } tbody th { width: 160px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
.status { padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #e3e6ec; }
.s-success { background: #d5f2dc; } .s-error { background: #f9d6d5; } .s-cancel { background: #f3e3c4; }
.s-process { background: #d6e6fb; } .s-retry { background: #ecdcf5; }
form.inline, .bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
input, select, button { font: inherit; padding: 4px 8px; }
button { cursor: pointer; } .muted { color: #6b7385; }
pre { background: #fff; padding: 10px; border: 1px solid #e3e6ec; overflow: auto; }
ol#values { background: #fff; border: 1px solid #e3e6ec; padding: 8px 8px 8px 48px; max-height: 480px; overflow: auto; }
#error { color: #a3221b; }
</style>
<script>
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }
function badge(s) { return `<span class="status s-${esc(s)}">${esc(s)}</span>`; }
function ago(t) { const s = Math.max(Date.now() / 1000 - t, 0); return s < 90 ? s.toFixed(1) + " s" : s < 5400 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h"; }
function link(u) { return `<a class="mono" href="/tasks/${esc(u)}">${esc(u)}</a>`; }
async function getJSON(url, options) { const r = await fetch(url, options); return [r.status, await r.json()]; }
</script>
</head>
<body><header><strong>qtasks</strong><a href="/">Overview</a><a href="/tasks">Tasks</a><a href="/dlq">Dead letters</a></header>
<main>{body}</main>
</body></html>
"""

OVERVIEW = """
<h1>Overview</h1>
<p id="group" class="muted">reading the group…</p>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>Worker</th><th>Host</th><th>Partitions</th><th>Running</th></tr></thead><tbody></tbody></table>
<h2>Running tasks</h2>
<table id="running"><thead><tr><th>Task</th><th>Name</th><th>Worker</th><th>Attempt</th><th>Values</th><th>Running for</th></tr></thead><tbody></tbody></table>
<h2>Lag per tasks partition</h2>
<table id="partitions"><thead><tr><th>Partition</th><th>End</th><th>Committed</th><th>Lag</th><th>Worker</th></tr></thead><tbody></tbody></table>
<h2>Submit a task</h2>
<form id="submit" class="inline">
  <select name="name">{names}</select>
  <input name="args" value="[]" size="30" aria-label="args (a JSON list)">
  <input name="kwargs" value="{}" size="30" aria-label="kwargs (a JSON object)">
  <button type="submit">Submit</button> <span id="error"></span>
</form>
<script>
async function refresh() {
  try {
    const [status, g] = await getJSON("/api/group");
    if (status !== 200) throw new Error(g.error || status);
    document.getElementById("group").textContent = `group ${g.group}: ${g.state}, ${g.workers.length} worker(s), lag ${g.lag}`;
    document.querySelector("#workers tbody").innerHTML = g.workers.map(w =>
      `<tr><td class="mono">${esc(w.worker)}</td><td>${esc(w.host)}</td><td>${w.partitions.join(", ") || "-"}</td><td>${w.running.length}</td></tr>`).join("");
    document.querySelector("#running tbody").innerHTML = g.workers.flatMap(w => w.running.map(t =>
      `<tr><td>${link(t.uuid)}</td><td>${esc(t.task_name)}</td><td class="mono">${esc(w.worker)}</td><td>${t.attempt}</td><td>${t.yield_count}</td><td>${ago(t.started_at || t.updated_at)}</td></tr>`)).join("");
    document.querySelector("#partitions tbody").innerHTML = g.partitions.map(p =>
      `<tr><td>${p.partition}</td><td>${p.end}</td><td>${p.committed ?? "-"}</td><td>${p.lag}</td><td class="mono">${esc(p.worker || "-")}</td></tr>`).join("");
  } catch (e) { document.getElementById("group").textContent = "cannot read the group: " + e; }
}
refresh(); setInterval(refresh, 2000);
document.getElementById("submit").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, error = document.getElementById("error");
  try {
    const body = {name: form.name.value, args: JSON.parse(form.args.value || "[]"), kwargs: JSON.parse(form.kwargs.value || "{}")};
    const [status, out] = await getJSON("/api/tasks", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (status !== 201) { error.textContent = out.error; return; }
    location.href = "/tasks/" + out.uuid;
  } catch (e) { error.textContent = "args must be a JSON list and kwargs a JSON object: " + e; }
});
</script>
"""

TASKS = """
<h1>Tasks</h1>
<form class="inline" id="filters">
  <select name="status"><option value="">any status</option><option>new</option><option>process</option>
  <option>success</option><option>error</option><option>cancel</option><option>retry</option></select>
  <input name="name" placeholder="task name">
  <input name="limit" value="100" size="5" aria-label="at most">
  <button type="submit">Filter</button>
</form>
<table id="tasks"><thead><tr><th>Task</th><th>Name</th><th>Status</th><th>Attempt</th><th>Values</th><th>Worker</th><th>Updated</th></tr></thead><tbody></tbody></table>
<script>
const form = document.getElementById("filters"), query = new URLSearchParams(location.search);
for (const key of ["status", "name", "limit"]) if (query.has(key)) form[key].value = query.get(key);
async function refresh() {
  const params = new URLSearchParams({status: form.status.value, name: form.name.value, limit: form.limit.value});
  const [, tasks] = await getJSON("/api/tasks?" + params);
  document.querySelector("#tasks tbody").innerHTML = tasks.map(t =>
    `<tr><td>${link(t.uuid)}</td><td>${esc(t.task_name)}</td><td>${badge(t.status)}</td><td>${t.attempt}</td><td>${t.yield_count}</td><td class="mono">${esc(t.worker || "-")}</td><td>${ago(t.updated_at)} ago</td></tr>`).join("");
}
form.addEventListener("submit", (e) => { e.preventDefault(); history.replaceState(null, "", "?" + new URLSearchParams(new FormData(form))); refresh(); });
refresh(); setInterval(refresh, 2000);
</script>
"""

TASK = """
<h1>Task <span class="mono">__UUID_HTML__</span></h1>
<div class="bar"><span id="status" class="status">…</span> <span id="summary" class="muted"></span>
  <button id="cancel" hidden>Cancel</button></div>
<table><tbody id="fields"></tbody></table>
<div id="ending"></div>
<h2>Values <span id="count" class="muted">0</span></h2>
<ol id="values"></ol>
<script>
const uuid = __UUID_JS__, path = encodeURIComponent(uuid);
let finished = false;
function show(t) {
  const s = document.getElementById("status");
  s.className = "status s-" + t.status; s.textContent = t.status;
  finished = ["success", "error", "cancel", "retry"].includes(t.status);
  document.getElementById("cancel").hidden = finished;
  document.getElementById("summary").textContent = `${t.task_name}, attempt ${t.attempt}` + (t.worker ? ` on ${t.worker}` : "");
  const when = (s) => s ? new Date(s * 1000).toISOString() : "-";
  const rows = [["name", t.task_name], ["args", JSON.stringify(t.args ?? [])], ["kwargs", JSON.stringify(t.kwargs ?? {})],
    ["created", when(t.created_at)], ["started", when(t.started_at)], ["updated", when(t.updated_at)],
    [finished ? "ran for" : "running for", t.started_at ? (finished ? ((t.updated_at - t.started_at).toFixed(1) + " s") : ago(t.started_at)) : "-"],
    ["values stored", t.yield_count ?? 0], ["retry of", t.retry_parent_uuid || "-"], ["retried as", t.retry_child_uuid || "-"]];
  document.getElementById("fields").innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td class="mono">${esc(v)}</td></tr>`).join("");
  const ending = document.getElementById("ending");
  if (t.status === "error" && t.traceback) ending.innerHTML = `<h2>Traceback</h2><pre id="traceback">${esc(t.traceback)}</pre>`;
  else if (t.status === "cancel") ending.innerHTML = `<p id="cancel-reason">Cancelled: ${esc(t.cancel_reason || "no reason given")}</p>`;
  else if (t.status === "success" && t.yield_count === 0 && t.returning !== null) ending.innerHTML = `<h2>Returned</h2><pre>${esc(JSON.stringify(t.returning, null, 2))}</pre>`;
}
async function refresh() { const [status, t] = await getJSON("/api/tasks/" + path); if (status === 200) show(t); }
const values = document.getElementById("values"), count = document.getElementById("count");
const source = new EventSource(`/api/tasks/${path}/events`);
const seen = new Set();  // a reconnecting EventSource gets the stream again from its start
source.addEventListener("value", (e) => {
  const v = JSON.parse(e.data), key = `${v.uuid}/${v.seq}`;
  if (seen.has(key)) return;
  seen.add(key);
  const li = document.createElement("li");
  li.className = "value mono"; li.dataset.seq = v.seq; li.textContent = JSON.stringify(v.value);
  values.appendChild(li); count.textContent = values.children.length; values.scrollTop = values.scrollHeight;
});
source.addEventListener("end", (e) => { source.close(); show(JSON.parse(e.data)); });
source.addEventListener("error", (e) => {
  if (e.data) { source.close(); document.getElementById("ending").innerHTML = `<p id="error">${esc(JSON.parse(e.data).error)}</p>`; }
  else if (finished) source.close();
});
document.getElementById("cancel").addEventListener("click", async () => {
  await fetch(`/api/tasks/${path}/cancel`, {method: "POST"}); refresh();
});
refresh(); const timer = setInterval(() => { if (finished) clearInterval(timer); else refresh(); }, 1000);
</script>
"""

DLQ = """
<h1>Dead letters</h1>
<p class="muted">Records the workers could not use. A letter is replayed once it decodes (a task record comes back as a new task).</p>
<div class="bar"><button id="replay-all">Replay all</button> <span id="outcome"></span></div>
<table id="letters"><thead><tr><th>#</th><th>When</th><th>Origin</th><th>Reason</th><th>Value</th><th></th></tr></thead><tbody></tbody></table>
<script>
async function refresh() {
  const [, letters] = await getJSON("/api/dlq");
  document.querySelector("#letters tbody").innerHTML = letters.map(l =>
    `<tr><td>${l.number}</td><td>${new Date(l.at * 1000).toISOString()}</td><td class="mono">${esc(l.topic)}[${l.partition}]@${l.offset}</td>` +
    `<td>${esc(l.reason)}</td><td class="mono">${esc((l.value || "").slice(0, 200))}</td>` +
    `<td><button data-number="${l.number}" class="replay">Replay</button></td></tr>`).join("");
}
async function replay(url) {
  const [, results] = await getJSON(url, {method: "POST"});
  document.getElementById("outcome").innerHTML = results.map(r => r.refused ? `#${r.number}: ${esc(r.refused)}` : `#${r.number} replayed as ${link(r.uuid)}`).join("; ");
}
document.getElementById("letters").addEventListener("click", (e) => { if (e.target.dataset.number) replay(`/api/dlq/${e.target.dataset.number}/replay`); });
document.getElementById("replay-all").addEventListener("click", () => replay("/api/dlq/replay"));
refresh();
</script>
"""
