"""A throwaway single-node Kafka broker for tests (stdlib only, Python 3.11+).

Wraps ``deploy/local/kafka.sh`` (found next to this file, so any cwd works)::

    from broker import LocalKafka          # or load it by path, see README.md

    @pytest.fixture(scope="session")
    def kafka():
        with LocalKafka() as k:             # free port, fresh temp data dir
            yield k.bootstrap               # "127.0.0.1:PORT"

Each instance gets its own temporary data directory (removed by ``stop()``)
unless ``data_dir`` is given, so test sessions never share state. The broker
is also stopped at interpreter exit, and a watchdog in kafka.sh stops it if
this process dies without cleaning up (e.g. SIGKILL).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["KAFKA_SH", "LocalKafka", "free_port"]

KAFKA_SH = Path(__file__).resolve().parent / "kafka.sh"

# Extra time allowed on top of the broker start timeout for a cold jar fetch.
_FETCH_ALLOWANCE = 900.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class LocalKafka:
    """A real Apache Kafka 4.x broker (KRaft, broker+controller) on 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        extra_props: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """
        port: broker port; None picks a free one (and retries on a bind race).
        data_dir: the broker's data directory (config, logs, partitions); kept
            after stop(). None: a fresh temporary directory, removed by stop().
        extra_props: server.properties overrides, e.g. {"log.segment.bytes": 1 << 20}.
        env: extra environment for kafka.sh (e.g. KAFKA_HEAP, QTASKS_KAFKA_CACHE).
        """
        self._auto_port = port is None
        self.port: int = free_port() if port is None else int(port)
        self._own_dir = data_dir is None
        self.data_dir: Path = (
            Path(tempfile.mkdtemp(prefix="qtasks-kafka-")) if data_dir is None else Path(data_dir).resolve()
        )
        self.extra_props = dict(extra_props or {})
        self._env = dict(env or {})
        self._started = False
        self._atexit_registered = False

    # ------------------------------------------------------------ properties

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("kafka.out", "server.log"):
            text = _tail(self.data_dir / name, lines)
            if text.strip():
                parts.append(f"---- {self.data_dir / name} ----\n{text}")
        return "\n".join(parts)

    # ------------------------------------------------------------ control

    def _sh_env(self, start_timeout: float | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env)
        env["QTASKS_KAFKA_DATA_DIR"] = str(self.data_dir)
        env["QTASKS_KAFKA_OWNER_PID"] = str(os.getpid())
        if start_timeout is not None:
            env["QTASKS_KAFKA_START_TIMEOUT"] = str(max(1, int(start_timeout)))
        if self.extra_props:
            env["QTASKS_KAFKA_EXTRA_PROPS"] = "\n".join(f"{k}={v}" for k, v in self.extra_props.items())
        return env

    def _run(self, *args: str, timeout: float, start_timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            env=self._sh_env(start_timeout),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 180.0) -> None:
        """Fetch jars if needed, start the broker, return once it serves requests.

        timeout bounds the broker's own startup; a cold jar fetch gets extra time.
        Raises RuntimeError with the broker log tail on failure.
        """
        if self._started:
            return
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                proc = self._run(
                    "start",
                    str(self.port),
                    timeout=timeout + _FETCH_ALLOWANCE,
                    start_timeout=timeout,
                )
            except subprocess.TimeoutExpired as e:
                self._stop_quietly()
                raise RuntimeError(
                    f"kafka.sh start {self.port} did not finish in {e.timeout:.0f}s\n" + self.log_tail()
                ) from None
            if proc.returncode == 0:
                self._started = True
                if not self._atexit_registered:
                    atexit.register(self._atexit)
                    self._atexit_registered = True
                return
            detail = f"{proc.stdout}\n{proc.stderr}"
            bind_race = "Address already in use" in detail or ("already in use" in detail and "127.0.0.1" in detail)
            if bind_race and attempt + 1 < attempts:
                self._stop_quietly()
                self.port = free_port()
                continue
            self._stop_quietly()
            raise RuntimeError(
                f"local Kafka broker failed to start on {self.bootstrap} "
                f"(kafka.sh exit {proc.returncode}; data dir kept: {self.data_dir}):\n"
                f"{proc.stderr.strip()}\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); remove the temp data dir."""
        try:
            proc = self._run("stop", str(self.port), timeout=120.0)
            if proc.returncode != 0:
                raise RuntimeError(f"kafka.sh stop {self.port} failed: {proc.stderr.strip()}")
        finally:
            self._started = False
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def _stop_quietly(self) -> None:
        """Best-effort stop that keeps the data dir (used on failed starts)."""
        try:
            self._run("stop", str(self.port), timeout=120.0)
        except Exception:
            pass

    def _atexit(self) -> None:
        if self._started:
            try:
                self.stop()
            except Exception:
                pass

    def is_running(self) -> bool:
        try:
            return self._run("status", str(self.port), timeout=30.0).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # ------------------------------------------------------------ context manager

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"LocalKafka({self.bootstrap}, {state}, data_dir={str(self.data_dir)!r})"


if __name__ == "__main__":  # manual check: python deploy/local/broker.py
    import time

    t0 = time.monotonic()
    with LocalKafka() as k:
        print(f"{k!r} ready in {time.monotonic() - t0:.1f}s")
    print("stopped")
