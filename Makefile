# fabric-agent: one entry point for every check.
#   make run     venv + install, then the agent in the foreground on this host
#   make test    installs what the tests need (Debian packages too), then the whole suite
#   make install the venv alone
#   make lint / make bench / make run-sim / make proto (regenerate agent/proto from proto/)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  := .state
METRICS_LISTEN ?= 127.0.0.1:9478
SCENARIO ?= tests/fakenvml/scenarios/hgx-h200-8gpu.json
FAKENVML := tests/fakenvml/libnvidia-ml.so.1

# Debian packages: what `make test` needs (Prometheus and promtool for the end-to-end
# and exposition tests, iperf3 for real traffic, iproute2 for namespaces and tc,
# nftables (libnftables for the agent, nft for inspecting it in tests), a C compiler
# for the simulated NVML driver), etcd-server for the aggregator's etcd store contract tests,
# Slurm and munge for the one-node test cluster (tests/slurm/; its cgroup shim needs gcc),
# and what `make bench` adds (the node exporter anchor).
TEST_DEBS  := prometheus iperf3 iproute2 nftables libnftables1 gcc make libc6-dev shellcheck \
              etcd-server slurmd slurmctld slurm-client munge
BENCH_DEBS := prometheus-node-exporter

.PHONY: install run run-sim test lint pytest bench fakenvml proto clean debs debs-test debs-bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory debs DEBS=python3-venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: install
	@mkdir -p $(STATE)
	@echo "fabric-agent: metrics on http://$(METRICS_LISTEN)/metrics, gRPC API on unix:$(STATE)/agent.sock, state in ./$(STATE); Ctrl-C stops"
	@echo "  try: curl -s http://$(METRICS_LISTEN)/metrics | grep ^fabric_  or  $(VENV)/bin/fabric-agent sample --once"
	$(VENV)/bin/fabric-agent run --config systemd/agent.yaml \
		--metrics-listen $(METRICS_LISTEN) --state-dir $(STATE) --grpc-socket $(STATE)/agent.sock \
		--grpc-listen 127.0.0.1:9479

# The agent against the simulated 8-GPU H200 node (no driver needed).
run-sim: install fakenvml
	@mkdir -p $(STATE)
	FAKE_NVML_SCENARIO=$(SCENARIO) $(VENV)/bin/fabric-agent run --config systemd/agent.yaml \
		--metrics-listen $(METRICS_LISTEN) --state-dir $(STATE) --grpc-socket $(STATE)/agent.sock \
		--grpc-listen 127.0.0.1:9479 --nvml-library $(FAKENVML)

fakenvml:
	$(MAKE) --no-print-directory -C tests/fakenvml

test: debs-test $(VENV)/.installed-test fakenvml lint pytest

pytest: $(VENV)/.installed-test fakenvml
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check agent tests bench proto
	$(VENV)/bin/ruff format --check agent tests bench proto
	$(VENV)/bin/mypy

# Regenerate agent/proto/fabric from proto/ with the pinned grpcio-tools (the venv's
# python -m grpc_tools.protoc) and mypy-protobuf; tests/test_proto.py fails when stale.
proto: $(VENV)/.installed-test
	$(PY) proto/generate.py

bench: debs-test debs-bench $(VENV)/.installed-test fakenvml
	$(PY) bench/agent_overhead.py $(BENCH_ARGS)
	$(PY) bench/tick_cost.py
	$(PY) bench/nic_dump.py
	$(PY) bench/job_refresh.py
	$(PY) bench/qos_apply.py
	$(PY) bench/qos_accuracy.py
	$(PY) bench/job_classify.py
	$(PY) bench/slurm_job_traffic.py
	$(PY) bench/api_snapshot.py
	$(PY) bench/api_watch.py
	$(PY) bench/api_hostile.py
	$(PY) bench/aggregator_load.py
	$(PY) bench/aggregator_hostile.py
	$(PY) bench/slurm_prolog.py
	$(PY) bench/slurm_hooks.py

debs-test:
	@$(MAKE) --no-print-directory debs DEBS="$(TEST_DEBS)"

debs-bench:
	@$(MAKE) --no-print-directory debs DEBS="$(BENCH_DEBS)"

# Install the named Debian packages that are missing; nothing when all are present.
debs:
	@missing=""; for p in $(DEBS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

clean:
	rm -rf $(VENV) $(STATE) .mypy_cache .ruff_cache .pytest_cache
	$(MAKE) -C tests/fakenvml clean
