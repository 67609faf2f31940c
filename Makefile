# `make demo` and `make test` set everything up from nothing (virtual environment, package,
# Debian's Fashion-MNIST) and then run.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
BIN    := $(VENV)/bin

.PHONY: setup setup-test demo test test-fast lint bench rgb clean

setup: $(STAMP)
	./scripts/install-system.sh

setup-test: $(STAMP)
	./scripts/install-system.sh --test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,onnx]'
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
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/carprune bench

# A real pretrained RGB network: MTCNN's ONet, whose weights ship in facenet-pytorch's wheel.
# --no-deps: facenet-pytorch pins an old torch and torchvision; carprune only reads its weights.
rgb: setup
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
	$(BIN)/pip install --quiet --disable-pip-version-check scikit-image==0.26.0
	$(BIN)/python benchmarks/rgb_pretrained.py --out runs/rgb/rgb.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
