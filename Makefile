# Anytime: the two set-up commands are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Debian packages the test suite uses (real data, real Prometheus and HAProxy, compose validation).
TEST_DEBS := dataset-fashion-mnist prometheus docker-compose haproxy

.PHONY: serve test lint venv debs install-debs reproduce reproduce-cifar100 default-model bench bench-gpu bench-triton cluster docker-smoke

venv: $(STAMP)

# Re-install when the project's metadata changes; pip's cap file (if any) pins torch 2.14.1 here.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

debs:
	@$(MAKE) --no-print-directory install-debs DEBS="$(TEST_DEBS)"

# Installs the Debian packages named in DEBS when root, else prints the apt-get command and fails.
install-debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "The tests need Debian packages:$$missing"; \
	    echo "Run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

test: venv debs
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Serves the bundled default model (its newest version in model_store/fashion-mnist/); ANYTIME_* variables override settings.
serve: venv
	ANYTIME_HOST=$(HOST) ANYTIME_PORT=$(PORT) $(BIN)/anytime-serve

# REPLICAS replicas of the bundled model behind HAProxy on 127.0.0.1:$(PORT), scraped by Prometheus
# on 127.0.0.1:9090 (docs/deployment.md); ANYTIME_CLUSTER_* override the rest.
REPLICAS ?= 3
cluster: venv
	@$(MAKE) --no-print-directory install-debs DEBS="haproxy prometheus"
	$(BIN)/python -m tools.cluster --replicas $(REPLICAS) --port $(PORT)

# Builds the images and runs them with a real Docker engine (docs/deployment.md, "Docker"); root, at most 30 min.
docker-smoke: venv
	@$(MAKE) --no-print-directory install-debs DEBS="docker.io docker-compose debootstrap dataset-fashion-mnist"
	timeout 1800 $(BIN)/python -m tools.docker_smoke

# Training recipes (docs/training.md).
# The study: standard, dsn, byot, byot-nohint and ramps, 3 seeds each, resumable. It took 70 min on
# 2 cores as two processes (--methods split between them); this one process takes about twice that.
STUDY_EPOCHS ?= 6
reproduce: venv debs
	$(BIN)/python -m training.reproduce --epochs $(STUDY_EPOCHS) --seeds 0 1 2 --threads 1 --no-progress

# The paper's CIFAR-100 setting (docs/training.md): standard, DSN and BYOT on ResNet-18, three seeds,
# resumable, the reference code's schedule (200 epochs, lr 0.1 divided by 10 at epochs 75, 130 and 180,
# batch 128, crop + flip). A GPU run; CIFAR100_DIR is the extracted python version (never downloaded).
CIFAR100_EPOCHS ?= 200
CIFAR100_SEEDS ?= 0 1 2
CIFAR100_ARGS ?=
reproduce-cifar100: venv
	@test -n "$(CIFAR100_DIR)" || { echo "make reproduce-cifar100 needs CIFAR100_DIR=<the extracted cifar-100-python directory or its parent>"; exit 2; }
	$(BIN)/python -m training.reproduce --dataset cifar100 --data-dir $(CIFAR100_DIR) --model resnet18 \
	  --methods standard dsn byot --epochs $(CIFAR100_EPOCHS) --seeds $(CIFAR100_SEEDS) --schedule multistep \
	  --milestones 0.375 0.65 0.9 --out-dir runs/cifar100 --report results/cifar100.md --no-progress $(CIFAR100_ARGS)

# Version 3 of the bundled model: an exit after every block (light heads), BYOT without the feature hint,
# 20 epochs (about 40 min on 2 CPU cores); export keeps the exits that pay.
EPOCHS ?= 20
DEFAULT_VERSION ?= 4
default-model: venv debs
	$(BIN)/anytime-train --model resnet_fmnist --exits 1 2 3 4 5 6 7 8 --exit-style light --method byot \
	  --hint none --augment standard --epochs $(EPOCHS) --schedule cosine --out-dir runs/default-model \
	  $(if $(wildcard runs/default-model/last.pt),--resume,)
	$(BIN)/anytime-export runs/default-model/best.pt --store model_store --name fashion-mnist \
	  --version $(DEFAULT_VERSION) --epsilon 0.5

# Benchmarks (docs/benchmarks.md): servers and load on 127.0.0.1, each run bounded in time.
# TorchServe is a benchmark peer only: installed here, never by the product (it needs Java 17).
# wrk (Debian) is the load generator; servers and wrk are pinned to different cores (needs 2).
bench: venv debs
	@$(MAKE) --no-print-directory install-debs DEBS="wrk"
	$(BIN)/python -m pip install -q 'torchserve>=0.12,<0.13' 'torch-model-archiver>=0.12,<0.13'
	$(BIN)/python -m bench.run

# Triton's perf_analyzer against /v2 (docs/benchmarks.md, "Triton's perf_analyzer"): HTTP and gRPC, both inputs,
# anytime and full depth. Where glibc is older than 2.38 perf_analyzer runs in a Debian 13 root (root, debootstrap).
bench-triton: venv debs
	@$(MAKE) --no-print-directory install-debs DEBS="debootstrap"
	$(BIN)/python -m bench.triton

# The GPU benchmark (docs/benchmarks.md, "GPU"): in-process engine, ceilings, compute-bound mixes, HTTP rows.
# On a machine without CUDA it runs the same code at small sizes.
bench-gpu: venv debs
	@$(MAKE) --no-print-directory install-debs DEBS="wrk"
	$(BIN)/python -m bench.gpu --http
