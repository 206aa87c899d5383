# One command sets everything up and runs the tests: `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-engine clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so nothing later pulls a CUDA build.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-engine: $(STAMP)
	$(PY) bench/engine.py --family flux-fill --size small --resolution 1024 --mask-ratios 0.1,0.25,0.5,1.0 --json out/engine.json

clean:
	rm -rf $(VENV) out models

# The main job until the server lands: build the tiny model, edit a sample template in-process.
demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/instgenie make-model --family flux-fill --size tiny --out models/flux-fill-tiny
	$(PY) bench/sample_inputs.py out
	$(VENV)/bin/instgenie edit-local --model models/flux-fill-tiny --template out/template.png --mask out/mask.png \
		--prompt "a red hat" --steps 4 --max-sequence-length 32 --out out/edited.png
