# One command sets everything up and runs the tests: `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-engine bench-serving bench-cadence bench-cache bench-routing bench-soak bench-auto-register clean

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

bench-serving: $(STAMP)
	$(PY) bench/serving.py --json out/serving.json

bench-cadence: $(STAMP)
	$(PY) bench/step_cadence.py --json out/step_cadence.json

bench-cache: $(STAMP)
	$(PY) bench/cache.py --json out/cache.json --repeats 5

bench-routing: $(STAMP)
	$(PY) bench/routing.py --requests 40 --rounds 6 --json out/routing.json

bench-auto-register: $(STAMP)
	$(PY) bench/auto_register.py --json out/auto_register.json

bench-soak: $(STAMP)
	$(PY) bench/soak.py --minutes 10 --json out/soak.json

clean:
	rm -rf $(VENV) out models

# The main job: a Triton server with the tiny default model, a template registered and
# one edit through the CLI; writes out/edited.png.
demo: $(STAMP)
	scripts/demo.sh
