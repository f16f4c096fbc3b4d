"""What a user sees when the secure broker refuses them: a clear qtasks error within seconds, never a hang.

And no password in any log line, wherever it came from (the URL, the environment, a file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.exc import BrokerRefusedError
from tests.helpers import FAST, unique

ROOT = Path(__file__).resolve().parents[2]


async def refused(url: str, name: str | None = None, **settings: Any) -> tuple[BrokerRefusedError, float]:
    """Start an app (worker and client) on ``url``; the refusal it ends in, and how long it took."""
    app = QueueTasks(name=name or unique("sec"), broker_url=url, **{**FAST, **settings})
    started = time.monotonic()
    try:
        with pytest.raises(BrokerRefusedError) as caught:
            await app.start()
    finally:
        await app.stop(timeout=2)
    return caught.value, time.monotonic() - started


async def until_granted(url: str, needs: dict[str, tuple[str, ...]]) -> None:
    """Wait until the broker's authorizer has the ACLs just created (the controller answers
    AclCommand once it committed them; the broker applies them a moment later)."""
    async with asyncio.timeout(30):
        while True:
            connector = from_url(url, QueueConfig())
            try:
                await connector.start()  # its producer's id needs the cluster's IdempotentWrite
                await connector.check_access(needs)
                return
            except BrokerRefusedError:
                await asyncio.sleep(0.05)
            finally:
                await connector.stop()


async def test_a_wrong_password_is_refused_clearly_within_seconds(secure_kafka: Any) -> None:
    error, took = await refused(secure_kafka.url("qtasks", sasl_password="not-the-password"))
    assert took < 8  # the probe's own answer; a broker that did not answer takes connect_timeout (10 s)
    assert "refused the credentials of user 'qtasks' (SCRAM-SHA-512)" in str(error)
    assert "not-the-password" not in str(error)
    assert not error.retriable


async def test_an_unknown_user_is_refused_like_a_wrong_password(secure_kafka: Any) -> None:
    error, _ = await refused(secure_kafka.url("ghost", sasl_password="x"))
    assert "refused the credentials of user 'ghost'" in str(error)


async def test_a_certificate_from_another_ca_is_a_clear_tls_error(secure_kafka: Any, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    make_ca = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    make_ca += ["-days", "2", "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-subj", "/CN=another CA"]
    await asyncio.to_thread(subprocess.run, make_ca, check=True, capture_output=True)
    error, took = await refused(secure_kafka.url("qtasks", ssl_cafile=str(other)))
    assert took < 8  # the probe's own answer; a broker that did not answer takes connect_timeout (10 s)
    assert "TLS: the certificate of Kafka at" in str(error)
    assert "is not trusted" in str(error) and "kafka_ssl_cafile" in str(error)


async def test_plain_text_to_the_tls_listener_is_refused_clearly(secure_kafka: Any) -> None:
    error, took = await refused(f"kafka://{secure_kafka.bootstrap}")
    assert took < 8  # the probe's own answer; a broker that did not answer takes connect_timeout (10 s)
    assert "answers in TLS, but kafka_security_protocol is PLAINTEXT" in str(error)


async def test_tls_to_a_plain_listener_is_refused_clearly(kafka_bootstrap: str, secure_kafka: Any) -> None:
    url = f"kafka://{kafka_bootstrap}?security_protocol=SSL&ssl_cafile={secure_kafka.ca_file}"
    error, took = await refused(url)
    assert took < 8  # the probe's own answer; a broker that did not answer takes connect_timeout (10 s)
    assert f"TLS with Kafka at {kafka_bootstrap} failed" in str(error)
    assert "is its listener TLS?" in str(error)


async def test_a_user_without_acls_is_refused_at_start(secure_kafka: Any) -> None:
    error, took = await refused(secure_kafka.url("nobody"))
    assert took < 10
    # its producer asks for an id first, which needs IdempotentWrite on the cluster
    assert "denies this client access to the cluster" in str(error)
    assert "ClusterAuthorizationFailedError): grant it in the ACLs" in str(error)


async def test_a_worker_that_may_not_write_its_results_is_refused_at_start_not_stuck(secure_kafka: Any) -> None:
    """With every ACL an app needs but write on the results topic: the client starts, the worker does not."""
    name = unique("acl")
    grant = secure_kafka.acl
    await asyncio.to_thread(grant, "--add", "--allow-principal", "User:limited", "--operation", "All", "--group", "*")
    await asyncio.to_thread(
        grant,
        *("--add", "--allow-principal", "User:limited", "--operation", "Describe", "--operation", "DescribeConfigs"),
        *("--operation", "IdempotentWrite", "--cluster"),
    )
    await asyncio.to_thread(
        grant,
        *("--add", "--allow-principal", "User:limited", "--operation", "Read", "--operation", "Describe"),
        *("--operation", "Create", "--operation", "DescribeConfigs", "--resource-pattern-type", "prefixed"),
        *("--topic", f"{name}."),
    )
    writable = [f"{name}.{suffix}" for suffix in ("tasks", "status", "control", "dlq", "delays")]
    await asyncio.to_thread(
        grant,
        *("--add", "--allow-principal", "User:limited", "--operation", "Write"),
        *(arg for topic in writable for arg in ("--topic", topic)),
    )
    url = secure_kafka.url("limited")
    await until_granted(url, {f"{name}.tasks": ("write",), f"{name}.results": ("read",)})
    client = QueueTasks(name=name, broker_url=url, **FAST)
    worker = QueueTasks(name=name, broker_url=url, **FAST)
    try:
        task = await client.add_task("anything")  # a client may do all it needs
        assert task.status == "new"
        started = time.monotonic()
        with pytest.raises(BrokerRefusedError) as caught:
            await worker.start()
        assert time.monotonic() - started < 10
        assert f"does not let user 'limited' do what this app needs: write on topic '{name}.results'" in str(
            caught.value
        )
    finally:
        await worker.stop(timeout=2)
        await client.stop(timeout=2)


async def test_a_worker_that_may_not_read_its_group_is_refused_at_start(secure_kafka: Any) -> None:
    """Every topic ACL an app needs, none on its consumer group: the worker names the group."""
    name = unique("grp")
    await asyncio.to_thread(
        secure_kafka.acl,
        *("--add", "--allow-principal", "User:groupless", "--operation", "Describe", "--operation", "DescribeConfigs"),
        *("--operation", "IdempotentWrite", "--cluster"),
    )
    await asyncio.to_thread(
        secure_kafka.acl,
        *("--add", "--allow-principal", "User:groupless", "--operation", "All"),
        *("--resource-pattern-type", "prefixed", "--topic", f"{name}."),
    )
    await until_granted(secure_kafka.url("groupless"), {f"{name}.results": ("read", "write")})
    error, took = await refused(secure_kafka.url("groupless"), name=name)
    assert took < 10
    assert f"does not let user 'groupless' do what this app needs: read on group '{name}-workers'" in str(error)


def test_the_cli_worker_exits_with_one_line_on_a_wrong_password(secure_kafka: Any) -> None:
    """``qtasks run`` waits for a broker that does not answer; one that refuses it ends it at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    url = secure_kafka.url("qtasks", sasl_password="wrong-one")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "qtasks", "-A", "tests.unit.cli_app:app", "--broker", url, "run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30  # the process's start included; it would wait forever
    lines = [line for line in done.stderr.splitlines() if line.startswith("qtasks:")]
    assert lines == [lines[0]] and "refused the credentials of user 'qtasks'" in lines[0], done.stderr
    assert "wrong-one" not in done.stderr + done.stdout


async def test_no_password_reaches_a_log_line(secure_kafka: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG (aiokafka's too) through a start, a task, a refusal and a stop."""
    password = secure_kafka.password_file("qtasks").read_text().strip()
    caplog.set_level(logging.DEBUG)
    name = unique("logs")
    app = QueueTasks(name=name, broker_url=secure_kafka.url("qtasks", sasl_password=password), **FAST)

    @app.task
    async def count(n: int) -> Any:
        for i in range(n):
            yield i

    try:
        await app.start()
        done = await app.add_task("count", 3, timeout=30)
        assert done is not None and done.status == "success"
        shown = [repr(app.config), str(app.config)]
    finally:
        await app.stop(timeout=5)
    error, _ = await refused(secure_kafka.url("qtasks", sasl_password=password + "x"))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) > 20  # DEBUG lines were there to look at
    for text in [*lines, *shown, str(error)]:
        assert password not in text


def test_no_password_in_a_cli_worker_s_output(secure_kafka: Any, tmp_path: Path) -> None:
    """A worker at DEBUG with JSON logs, its password from the environment, runs a task and stops."""
    password = secure_kafka.password_file("qtasks").read_text().strip()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QTASKS_LOG_LEVEL": "DEBUG",
        "QTASKS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "QTASKS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "QTASKS_KAFKA_SASL_USERNAME": "qtasks",
        "QTASKS_KAFKA_SASL_PASSWORD": password,
        "QTASKS_KAFKA_SSL_CAFILE": str(secure_kafka.ca_file),
    }
    cli = [
        sys.executable,
        "-m",
        "qtasks",
        "-A",
        "tests.unit.cli_app:app",
        "--broker",
        f"kafka://{secure_kafka.bootstrap}",
    ]
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        worker = subprocess.Popen(
            [*cli, "run", "--log-format", "json"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
        try:
            added = subprocess.run(
                [*cli, "add", "count", "3", "--follow"],
                cwd=ROOT,
                env={**env, "QTASKS_LOG_LEVEL": "INFO"},
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert added.returncode == 0, added.stderr
            assert added.stdout.split()[-3:] == ["v0", "v1", "v2"]
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
    logged = out.read_text() + err.read_text()
    assert "qtasks" in logged and len(logged.splitlines()) > 20
    assert password not in logged + added.stdout + added.stderr
