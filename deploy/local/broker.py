"""A throwaway Kafka broker or cluster for tests (stdlib only, Python 3.11+).

Wraps ``deploy/local/kafka.sh`` (found next to this file, so any cwd works)::

    from broker import LocalKafka          # or load it by path, see README.md

    @pytest.fixture(scope="session")
    def kafka():
        with LocalKafka() as k:             # free port, fresh temp data dir
            yield k.bootstrap               # "127.0.0.1:PORT"

``LocalKafka(brokers=3)`` is a cluster of three nodes on consecutive ports, each
a broker and a controller; ``kill_node``, ``stop_node``, ``freeze_node`` and
``start()`` (which starts the nodes that are down, on their data) let a test
take nodes away and bring them back.

Each instance gets its own temporary data directory (removed by ``stop()``)
unless ``data_dir`` is given, so test sessions never share state. The broker
is also stopped at interpreter exit, and a watchdog in kafka.sh stops it if
this process dies without cleaning up (e.g. SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["KAFKA_SH", "LocalKafka", "free_port", "free_ports"]

KAFKA_SH = Path(__file__).resolve().parent / "kafka.sh"

# Extra time allowed on top of the broker start timeout for a cold jar fetch.
_FETCH_ALLOWANCE = 900.0


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(ports: range) -> bool:
    with contextlib.ExitStack() as held:
        try:
            for port in ports:
                s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that are free right now.

    They are taken below the kernel's ephemeral range, so that while a node is down and
    restarting, no client's outgoing connection can be given its port.
    """
    low = _ephemeral_low()
    if low - count <= 10000:
        low = 65536
    for _ in range(1000):
        first = random.randrange(10000, low - count)
        if _bindable(range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (below the ephemeral range)."""
    return free_ports(1)


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
    """A real Apache Kafka 4.x broker or cluster (KRaft, every node broker+controller) on 127.0.0.1."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        brokers: int = 1,
        extra_props: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
        security: str = "plaintext",
        users: tuple[str, ...] = (),
    ) -> None:
        """
        port: the first node's port (the others follow it); None picks free ones
            (and retries on a bind race).
        data_dir: the data directory (config, logs, partitions; a cluster's nodes
            in <data_dir>/<port>); kept after stop(). None: a fresh temporary
            directory, removed by stop().
        brokers: nodes in the cluster (1: a single broker).
        extra_props: server.properties overrides, e.g. {"log.segment.bytes": 1 << 20}.
        env: extra environment for kafka.sh (e.g. KAFKA_HEAP, QTASKS_KAFKA_CACHE).
        security: "plaintext", or "sasl_ssl": a SASL_SSL listener (SCRAM-SHA-512, a CA made
            at start) with an authorizer; users admin (super user) and qtasks (ACLs for any
            app) exist, plus ``users`` (no ACLs: grant them with ``acl``).
        """
        if security not in ("plaintext", "sasl_ssl"):
            raise ValueError(f"security must be plaintext or sasl_ssl, got {security!r}")
        self.security = security
        self.users = tuple(users)
        if not 1 <= brokers <= 9:
            raise ValueError(f"brokers must be 1 to 9, got {brokers}")
        self.brokers = brokers
        self._auto_port = port is None
        self.port: int = free_ports(brokers) if port is None else int(port)
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
    def ports(self) -> list[int]:
        """The nodes' ports, node 1 first."""
        return [self.port + i for i in range(self.brokers)]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    @property
    def ca_file(self) -> Path:
        """The CA that signed the brokers' certificate (secure mode)."""
        return self.node_dir(1) / "secure" / "ca.crt"

    def password_file(self, user: str = "qtasks") -> Path:
        """The file holding a user's SCRAM password (secure mode)."""
        return self.node_dir(1) / "secure" / f"{user}.password"

    def url(self, user: str = "qtasks", **options: str) -> str:
        """A ``kafka://`` URL for ``user`` (secure mode: SASL_SSL, SCRAM-SHA-512, the CA, the password file)."""
        query = dict(options)
        if self.security == "sasl_ssl":
            query = {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": user,
                "sasl_password_file": str(self.password_file(user)),
                "ssl_cafile": str(self.ca_file),
                **query,
            }
        text = "&".join(f"{k}={v}" for k, v in query.items())
        return f"kafka://{self.bootstrap}" + (f"?{text}" if text else "")

    def acl(self, *args: str, timeout: float = 60.0) -> str:
        """Run Kafka's AclCommand as the admin user (secure mode); its output. RuntimeError if it fails."""
        done = self._run("acl", str(self.port), "--", *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"kafka.sh acl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def node_dir(self, node: int = 1) -> Path:
        """The data directory of node ``node`` (1-based)."""
        return self.data_dir if self.brokers == 1 else self.data_dir / str(self.ports[node - 1])

    @property
    def log_file(self) -> Path:
        return self.node_dir(1) / "server.log"

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for node in range(1, self.brokers + 1):
            for name in ("kafka.out", "server.log"):
                path = self.node_dir(node) / name
                text = _tail(path, lines)
                if text.strip():
                    parts.append(f"---- {path} ----\n{text}")
        return "\n".join(parts)

    # ------------------------------------------------------------ control

    def _sh_env(self, start_timeout: float | None = None, brokers: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env)
        env.pop("QTASKS_KAFKA_DATA_DIR", None)
        if self.brokers == 1:
            env["QTASKS_KAFKA_DATA_DIR"] = str(self.data_dir)
        else:
            env["QTASKS_KAFKA_DATA"] = str(self.data_dir)
        env["KAFKA_BROKERS"] = str(self.brokers if brokers is None else brokers)
        env["QTASKS_KAFKA_OWNER_PID"] = str(os.getpid())
        env["KAFKA_SECURITY"] = self.security
        env["KAFKA_SCRAM_USERS"] = " ".join(self.users)
        if start_timeout is not None:
            env["QTASKS_KAFKA_START_TIMEOUT"] = str(max(1, int(start_timeout)))
        if self.extra_props:
            env["QTASKS_KAFKA_EXTRA_PROPS"] = "\n".join(f"{k}={v}" for k, v in self.extra_props.items())
        return env

    def _run(
        self, *args: str, timeout: float, start_timeout: float | None = None, brokers: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            env=self._sh_env(start_timeout, brokers),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 180.0) -> None:
        """Fetch jars if needed, start the nodes that are down, return once every node serves requests.

        timeout bounds the nodes' own startup; a cold jar fetch gets extra time.
        Raises RuntimeError with the broker log tail on failure.
        """
        if self._started:
            proc = self._run("start", str(self.port), timeout=timeout + 30, start_timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"kafka.sh start {self.port} failed:\n{proc.stderr.strip()}\n{self.log_tail()}")
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
            if bind_race and attempt + 1 < attempts and self._own_dir:
                # Another process took a port first: new ports, and a fresh temporary dir
                # (what was formatted there belongs to the old ports).
                self._stop_quietly()
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir.mkdir()
                self.port = free_ports(self.brokers)
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

    # ------------------------------------------------------------ one node of a cluster

    def node_pid(self, node: int) -> int | None:
        """The pid of node ``node`` (1-based) if it runs: a live process running that node's
        broker (not a stale pid file's number that another process has now)."""
        try:
            pid = int((self.node_dir(node) / "kafka.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            return None
        if f"kafka.Kafka {self.node_dir(node)}/server.properties" not in cmdline or not _alive(pid):
            return None
        return pid

    def kill_node(self, node: int) -> None:
        """SIGKILL node ``node`` and wait until it is gone (its data stays)."""
        pid = self.node_pid(node)
        if pid is None:
            raise RuntimeError(f"node {node} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node} (pid {pid}) survived SIGKILL for 30 s")
            time.sleep(0.05)

    def stop_node(self, node: int) -> None:
        """Stop node ``node`` as an operator would (SIGTERM: a controlled shutdown)."""
        proc = self._run("stop", str(self.ports[node - 1]), timeout=120.0, brokers=1)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka.sh stop {self.ports[node - 1]} failed: {proc.stderr.strip()}")

    def freeze_node(self, node: int) -> None:
        """SIGSTOP node ``node`` and return once it is stopped: it holds its connections and answers nothing.

        A signal takes effect a moment after ``kill`` returns (every thread of the JVM must
        stop): until ``/proc`` shows the process stopped, the node may still answer.
        """
        pid = self.node_pid(node)
        if pid is None:
            raise RuntimeError(f"node {node} is not running")
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while self.node_state(node) != "T":
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node} (pid {pid}) did not stop within 10 s of SIGSTOP")
            time.sleep(0.01)

    def node_state(self, node: int) -> str | None:
        """The node's process state as ``/proc`` shows it (``S`` sleeping, ``T`` stopped, ...)."""
        pid = self.node_pid(node)
        if pid is None:
            return None
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    def thaw_node(self, node: int) -> None:
        """SIGCONT node ``node``."""
        pid = self.node_pid(node)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def _atexit(self) -> None:
        if self._started:
            try:
                self.stop()
            except Exception:
                pass

    def is_running(self) -> bool:
        """Whether every node runs."""
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":  # manual check: python deploy/local/broker.py
    import time

    t0 = time.monotonic()
    with LocalKafka() as k:
        print(f"{k!r} ready in {time.monotonic() - t0:.1f}s")
    print("stopped")
