"""Shared test helpers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable

#: Settings that make tests quick without changing behaviour.
FAST = {
    "lease_interval": 0.5,
    "lease_timeout": 3.0,
    "retry_backoff_base": 0.01,
    "retry_backoff_max": 0.05,
    "commit_interval": 0.05,
    "stop_timeout": 5.0,
    "tasks_partitions": 3,
    "results_partitions": 3,
    "status_partitions": 3,
}


async def until(predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.05) -> None:
    """Wait until ``predicate()`` holds (looked at every ``every`` s); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(every)


def unique(prefix: str = "t") -> str:
    """A fresh app name, so every test has its own topics."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago (for a subprocess that must be told its port).

    Below the kernel's ephemeral range, as the local broker's ports are: a port the kernel
    hands out (``bind`` to 0) can be given to any process's next outgoing connection before
    the subprocess binds it, and ``make test`` runs three test processes at once.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(10000, low if low > 10001 else 65536)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a broker that hangs)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
