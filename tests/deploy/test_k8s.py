"""deploy/k8s: the kustomize base is valid Kubernetes and KEDA, and matches the app it runs.

validate.sh builds kustomize and kubeconform with Go on a machine's first run (a few
minutes; they are kept in a cache every checkout shares); after that a run takes about a second.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from qtasks.asyncio import QueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors.kafka.connector import KafkaConnector

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
#: Where validate.sh keeps kustomize and kubeconform (shared by every checkout).
TOOLS = Path(
    os.environ.get("QTASKS_TOOLS") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtasks-tools"
)
VALIDATE = BASE / "validate.sh"
KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"}
# QTASKS_* names the worker reads that are no QueueConfig field: the image's command takes
# the app from QTASKS_APP, and QueueTasks its broker from QTASKS_BROKER_URL.
NOT_SETTINGS = {"QTASKS_APP", "QTASKS_BROKER_URL"}
# qtasks' SASL mechanisms by KEDA's names for them.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}

# The first run builds the tools.
pytestmark = pytest.mark.timeout(900)

Manifest = dict[str, Any]


def validate(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(VALIDATE), str(target)], capture_output=True, text=True, cwd=ROOT, timeout=880)


def summary(output: str) -> dict[str, int]:
    found = re.search(
        r"Summary: (\d+) resources? found .* - Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", output
    )
    assert found, output
    return dict(zip(("found", "valid", "invalid", "errors", "skipped"), map(int, found.groups()), strict=True))


@pytest.fixture(scope="module")
def validated() -> subprocess.CompletedProcess[str]:
    return validate(BASE)


@pytest.fixture(scope="module")
def manifests(validated: subprocess.CompletedProcess[str]) -> list[Manifest]:
    """The base as kustomize renders it (validate.sh built kustomize)."""
    assert validated.returncode == 0, validated.stdout + validated.stderr
    rendered = subprocess.run(
        [str(TOOLS / "bin" / "kustomize"), "build", str(BASE)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"no {kind} {name}"
    return found[0]


def worker(manifests: list[Manifest]) -> Manifest:
    containers: list[Manifest] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def secret_data(secret: Manifest) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def pod_env(manifests: list[Manifest]) -> dict[str, str]:
    """The worker container's environment, as the kubelet resolves it."""
    container = worker(manifests)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container["env"]:
        if "value" in var:
            # $(NAME): a variable defined before (envFrom, or earlier in env).
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda ref: env.get(ref[1], ref[0]), var["value"])
        elif ref := var["valueFrom"].get("secretKeyRef"):
            env[var["name"]] = secret_data(named(manifests, "Secret", ref["name"]))[ref["key"]]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = named(manifests, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def port(container: Manifest, value: int | str) -> int:
    """A port number, or the number of the container's port of that name."""
    if isinstance(value, int):
        return value
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == value]
    return int(number)


def kafka(app: QueueTasks) -> KafkaConnector:
    assert isinstance(app.broker, KafkaConnector)
    return app.broker


def kafka_trigger(manifests: list[Manifest]) -> Manifest:
    triggers: list[Manifest] = one(manifests, "ScaledObject")["spec"]["triggers"]
    (trigger,) = [t for t in triggers if t["type"] == "kafka"]
    return trigger


@pytest.fixture(scope="module")
def pod_app(manifests: list[Manifest], tmp_path_factory: pytest.TempPathFactory) -> QueueTasks:
    """The app of QTASKS_APP, made as the worker pod makes it: its environment, its files."""
    env = pod_env(manifests)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = tmp_path_factory.mktemp("pod")
    for mount in worker(manifests)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        data = secret_data(named(manifests, "Secret", secret["secretName"]))
        # The example Secret's CA is a placeholder; a real PEM bundle stands in for it.
        data["ca.crt"] = Path(certifi.where()).read_text()
        where = files / mount["mountPath"].lstrip("/")
        where.mkdir(parents=True)
        for item in secret["items"]:
            (where / item["path"]).write_text(data[item["key"]])
        env = {k: v.replace(mount["mountPath"] + "/", f"{where}/") for k, v in env.items()}
    module_name, _, attribute = env["QTASKS_APP"].partition(":")
    # The image runs docs/examples/<module>.py, copied to /app (its PYTHONPATH).
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "docs" / "examples" / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("QTASKS_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        spec.loader.exec_module(module)
    app: QueueTasks = getattr(module, attribute)
    return app


def test_every_object_of_the_base_is_valid(
    validated: subprocess.CompletedProcess[str], manifests: list[Manifest]
) -> None:
    assert validated.returncode == 0, validated.stdout + validated.stderr
    valid = set(re.findall(r"^stdin - (\w+) (\S+) is valid$", validated.stdout, re.M))
    assert valid == {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert {kind for kind, _ in valid} == KINDS
    assert summary(validated.stdout) == {
        "found": len(manifests),
        "valid": len(manifests),
        "invalid": 0,
        "errors": 0,
        "skipped": 0,
    }


@pytest.mark.parametrize(
    ("file", "good", "bad", "kind"),
    [
        ("deployment.yaml", "terminationGracePeriodSeconds: 45", 'terminationGracePeriodSeconds: "45"', "Deployment"),
        ("keda.yaml", "  maxReplicaCount: 6", "  maxReplicasCount: 6", "ScaledObject"),
    ],
)
def test_a_broken_manifest_fails_validation(
    validated: subprocess.CompletedProcess[str], tmp_path: Path, file: str, good: str, bad: str, kind: str
) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(BASE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    text = (copy / file).read_text()
    assert text.count(good) == 1
    (copy / file).write_text(text.replace(good, bad))
    result = validate(copy)
    assert result.returncode != 0
    assert re.search(rf"^stdin - {kind} \S+ is invalid", result.stdout, re.M), result.stdout
    assert summary(result.stdout)["invalid"] == 1


def test_keda_scales_the_apps_group_on_its_tasks_topic(manifests: list[Manifest], pod_app: QueueTasks) -> None:
    scaled = one(manifests, "ScaledObject")
    trigger = kafka_trigger(manifests)["metadata"]
    assert trigger["topic"] == pod_app.topics.tasks
    assert trigger["consumerGroup"] == pod_app.group_id
    # KEDA reads the servers from the worker container's environment.
    assert pod_env(manifests)[trigger["bootstrapServersFromEnv"]] == ",".join(kafka(pod_app).servers)
    # The workers' consumers start at the earliest offset (connectors/kafka/consumer.py).
    assert trigger["offsetResetPolicy"] == "earliest"
    # More workers than tasks partitions would sit idle.
    assert scaled["spec"]["maxReplicaCount"] == pod_app.config.tasks_partitions
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(manifests, "Deployment")["metadata"]["name"]


def test_keda_authenticates_like_the_workers(manifests: list[Manifest]) -> None:
    env = pod_env(manifests)
    auth = one(manifests, "TriggerAuthentication")
    assert kafka_trigger(manifests)["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"sasl", "username", "password", "tls", "ca"}
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert {ref["name"] for ref in refs.values()} == {volume["secretName"]}
    values = {
        parameter: secret_data(named(manifests, "Secret", ref["name"]))[ref["key"]] for parameter, ref in refs.items()
    }
    assert values["sasl"] == KEDA_SASL[env["QTASKS_KAFKA_SASL_MECHANISM"]]
    assert values["tls"] == ("enable" if env["QTASKS_KAFKA_SECURITY_PROTOCOL"].endswith("SSL") else "disable")
    assert values["username"] == env["QTASKS_KAFKA_SASL_USERNAME"]


def test_the_secret_reaches_the_worker_as_files_only_it_reads(manifests: list[Manifest], pod_app: QueueTasks) -> None:
    env = pod_env(manifests)
    container = worker(manifests)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["defaultMode"] == 0o400
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    files = {item["key"]: f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert env["QTASKS_KAFKA_SASL_PASSWORD_FILE"] == files["password"]
    assert env["QTASKS_KAFKA_SSL_CAFILE"] == files["ca.crt"]
    assert "QTASKS_KAFKA_SASL_PASSWORD" not in env
    # The worker's connector read the password from that file, and its CA (the app was made above).
    password = secret_data(named(manifests, "Secret", volume["secret"]["secretName"]))["password"]
    assert kafka(pod_app).options["sasl_plain_password"] == password
    assert kafka(pod_app).options["security_protocol"] == env["QTASKS_KAFKA_SECURITY_PROTOCOL"]
    assert kafka(pod_app).options["ssl_context"] is not None


def test_probes_and_the_metrics_service_use_the_workers_metrics_port(
    manifests: list[Manifest], pod_app: QueueTasks
) -> None:
    container = worker(manifests)
    metrics_port = pod_app.config.metrics_port
    assert metrics_port == int(pod_env(manifests)["QTASKS_METRICS_PORT"]) > 0
    assert port(container, "metrics") == metrics_port
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {name: (probe["path"], port(container, probe["port"])) for name, probe in probes.items()} == {
        "startupProbe": ("/healthz", metrics_port),
        "livenessProbe": ("/healthz", metrics_port),
        "readinessProbe": ("/readyz", metrics_port),
    }
    (service_port,) = one(manifests, "Service")["spec"]["ports"]
    assert service_port["name"] == "metrics"
    assert service_port["port"] == port(container, service_port["targetPort"]) == metrics_port
    annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)


def test_selectors_find_the_workers(manifests: list[Manifest]) -> None:
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(manifests, "Service")["spec"]["selector"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()


def test_the_kubelet_waits_for_the_workers_graceful_stop(manifests: list[Manifest], pod_app: QueueTasks) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert float(pod_env(manifests)["QTASKS_STOP_TIMEOUT"]) == pod_app.config.stop_timeout
    assert pod["terminationGracePeriodSeconds"] > pod_app.config.stop_timeout


def test_every_qtasks_variable_is_a_setting(manifests: list[Manifest]) -> None:
    settings = {f"QTASKS_{field.name.upper()}" for field in dataclasses.fields(QueueConfig)}
    names = {name for name in pod_env(manifests) if name.startswith("QTASKS_")}
    assert names - NOT_SETTINGS <= settings, names - NOT_SETTINGS - settings


def test_the_worker_runs_locked_down(manifests: list[Manifest]) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = worker(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    assert "replicas" not in one(manifests, "Deployment")["spec"]  # KEDA owns the count
