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

# Ray (the `distributed` extra, ~330 MB) for the tests and type checks of autodfp.distributed;
# the demo runs in one process and does without it.
$(VENV)/.distributed: $(VENV)/.installed
	$(PIP) -e '.[dev,vision,distributed]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: halve ResNet-56's MACs with a short SAC search on a
# data-free reward, reconstruct, refine, distil on the synthetic inputs, save to runs/demo, and
# print the before/after table. The default preset (`balanced`) with a shorter search and
# distillation, to fit a demo's minutes: 87.5 % top-1 in about 11 minutes on 2 cores (the full
# default: 89.48 % in 34 min; docs/RESULTS.md, "make demo").
demo: $(VENV)/.installed
	$(VENV)/bin/autodfp prune resnet56_cifar10 --macs-ratio 0.5 --episodes 40 --distill 400 --distill-inputs 0 \
		--out runs/demo

test: $(VENV)/.distributed
	$(PY) -m pytest -q

# Lint and type checks (CI runs them before the tests).
lint: $(VENV)/.distributed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
