# The project's interface: every target works on a fresh clone (it makes its own venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BROKER ?= memory
KAFKA_PORT ?= 9092
N ?= 20

.PHONY: install run test test-unit test-kafka lint format typecheck bench bench-rss bench-kafka kafka-up kafka-down clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
ifeq ($(BROKER),kafka)
	bash deploy/local/kafka.sh start $(KAFKA_PORT)
	QTASKS_BROKER_URL=kafka://127.0.0.1:$(KAFKA_PORT) $(BIN)/python docs/examples/streaming.py $(N)
else
	$(BIN)/python docs/examples/streaming.py $(N)
endif

# Lint, types, then every test: unit (memory://) and integration + faults on a real
# Apache Kafka broker that the test session starts itself.
test: install lint typecheck
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

test-kafka: install
	$(BIN)/pytest tests/integration tests/faults

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/bench_memory.py

bench-rss: install
	$(BIN)/python bench/bench_rss.py

bench-kafka: install
	$(BIN)/python bench/bench_kafka.py

kafka-up:
	bash deploy/local/kafka.sh start $(KAFKA_PORT)

kafka-down:
	bash deploy/local/kafka.sh stop $(KAFKA_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .kafka
