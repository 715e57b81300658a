# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the package with the pinned constraints.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
ASSETS ?= $(abspath ../shared/assets)
export AUTODFP_ASSETS ?= $(ASSETS)
export PYTHONUNBUFFERED := 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0+cpu
	$(PIP) -e '.[dev,vision]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: halve ResNet-56's MACs with a short SAC search on a
# data-free reward, reconstruct, save to runs/demo, and print the before/after table. The `fast`
# preset keeps it within minutes; the default `balanced` adds a data-free distillation (tens of
# minutes on a 2-core CPU, more accurate: docs/RESULTS.md, "Effort presets").
demo: $(VENV)/.installed
	$(VENV)/bin/autodfp prune resnet56_cifar10 --macs-ratio 0.5 --effort fast --episodes 60 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Lint and type checks (CI runs them before the tests).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
