# The project's interface: every target works on a fresh clone (it makes its own venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BROKER ?= memory
KAFKA_PORT ?= 9092
# Nodes of the local Kafka: 3 is a cluster on KAFKA_PORT, KAFKA_PORT+1, KAFKA_PORT+2. Unset:
# the cluster already made on KAFKA_PORT (kafka-down stops all its nodes), else one node.
KAFKA_BROKERS ?=
# plaintext, or sasl_ssl: the local broker with a SASL_SSL listener (SCRAM-SHA-512 users, a CA
# made at its first start) and an authorizer; `run` then connects as its qtasks user.
KAFKA_SECURITY ?=
N ?= 20
# Extra flags for bench, bench-peers and bench-share (see each script's --help), e.g. for bench-peers
# ARGS="--tasks-gen 100 --k 10 --tasks-short 300".
ARGS ?=
# Test processes of make test and test-kafka (pytest-xdist). Most of the suite's time is spent
# waiting on brokers (outages, session timeouts), so more processes than cores pay; each file
# runs whole in one process, the fault tests one after another (tests/conftest.py).
TEST_PROCESSES ?= 3
PARALLEL := -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

.PHONY: install browser-deps deploy-check test-deploy run test test-unit test-kafka test-browser test-cluster screenshot docs lint format typecheck bench bench-rss bench-kafka bench-peers bench-share kafka-up kafka-down clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The browser suite's headless Chromium and its driver, from Debian's packages (once).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

run: install
ifeq ($(BROKER),kafka)
	servers=$$(KAFKA_BROKERS=$(KAFKA_BROKERS) KAFKA_SECURITY=$(KAFKA_SECURITY) bash deploy/local/kafka.sh start $(KAFKA_PORT)) && \
	nodes=$$(echo "$$servers" | tr ',' '\n' | wc -l) && \
	if [ "$(KAFKA_SECURITY)" = sasl_ssl ]; then set -a && eval "$$(bash deploy/local/kafka.sh env $(KAFKA_PORT))" && set +a; fi && \
	QTASKS_BROKER_URL=kafka://$$servers QTASKS_REPLICATION_FACTOR=$$(( nodes < 3 ? nodes : 3 )) \
		$(BIN)/python docs/examples/streaming.py $(N)
else
	$(BIN)/python docs/examples/streaming.py $(N)
endif

# Lint, types, then every test: unit (memory://), integration + faults on a real
# Apache Kafka broker that the test session starts itself, and the dashboard in a browser.
test: install browser-deps lint typecheck deploy-check
	$(BIN)/pytest $(PARALLEL)

test-unit: install
	$(BIN)/pytest tests/unit

test-kafka: install
	$(BIN)/pytest $(PARALLEL) tests/integration tests/faults tests/secure

# The Kubernetes base rendered and validated offline (kustomize and kubeconform, built once with Go).
deploy-check: install
	bash deploy/k8s/validate.sh

# The deployment's checks: Dockerfile, compose, Kubernetes; and the secure broker's suite.
test-deploy: install
	$(BIN)/pytest tests/deploy tests/secure

# The dashboard in headless Chromium, on a real broker.
test-browser: install browser-deps
	$(BIN)/pytest tests/browser

# docs/dashboard-task.png, taken by the browser suite.
screenshot: install browser-deps
	QTASKS_SCREENSHOT=docs/dashboard-task.png $(BIN)/pytest tests/browser -k generator

# The node faults on a 3-node cluster (and a 60 s broker outage); prints what each cost.
test-cluster: install
	$(BIN)/pytest tests/faults/test_cluster_faults.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

# docs/reference.md from the code (settings, Task fields, triggers, events, the CLI).
docs: install
	$(BIN)/python -m qtasks.reference > docs/reference.md

bench: install
	$(BIN)/python bench/bench_memory.py $(ARGS)

bench-rss: install
	$(BIN)/python bench/bench_rss.py

bench-kafka: install
	$(BIN)/python bench/bench_kafka.py

# Share mode against group mode, every worker a process of its own; ARGS="--bootstrap HOST:PORT"
# uses a running broker (e.g. one from kafka-up) instead of starting one.
bench-share: install
	$(BIN)/python bench/bench_share.py $(ARGS)

# The bench extra (the peer engines, pinned) on top of dev, in the same venv.
$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

# The same two workloads on one local Kafka broker: raw aiokafka, qtasks, Faust, FastStream, Taskiq.
bench-peers: install $(VENV)/.installed-bench
	$(BIN)/python bench/bench_peers.py $(ARGS)

kafka-up:
	KAFKA_BROKERS=$(KAFKA_BROKERS) KAFKA_SECURITY=$(KAFKA_SECURITY) bash deploy/local/kafka.sh start $(KAFKA_PORT)

kafka-down:
	KAFKA_BROKERS=$(KAFKA_BROKERS) bash deploy/local/kafka.sh stop $(KAFKA_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .kafka
