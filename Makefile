# diffractflow: every target does the set-up it needs, idempotently (fresh Debian, as root).
#   make demo   the main job on embedded defaults
#   make test   the whole suite
SHELL := /bin/bash
VENV  := $(CURDIR)/.venv
PY    := $(VENV)/bin/python
READY := $(VENV)/.ready
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.diffractflow/prefect-home

.PHONY: setup test test-fast demo bench clean lab

setup: $(READY)

# 1. Debian's DIALS/dxtbx/cctbx (numpy 1.24.2) when missing; 2. a venv over Debian's python3 that
# sees them, with the libtbx build-dir link; 3. the project, pinned by constraints.txt.
$(READY): pyproject.toml constraints.txt
	@if ! /usr/bin/python3 -c "import dials, dxtbx, numba" 2>/dev/null || ! /usr/bin/python3 -c "import ensurepip" 2>/dev/null \
	    || ! command -v gcc >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "== installing Debian packages (python3-dials, python3-numba, python3-venv, gcc, chromium)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dials python3-numba python3-venv python3-pip gcc libc6-dev chromium >/dev/null; \
	fi
	@test -x $(VENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@test -e $(VENV)/lib/cctbx || ln -s /usr/lib/cctbx $(VENV)/lib/cctbx
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	@$(PY) -c "import dials, dxtbx, cctbx, torch, numpy, numba, prefect, nats; assert numpy.__version__ == '1.24.2', numpy.__version__; print('environment ok: numpy', numpy.__version__, 'torch', torch.__version__, 'prefect', prefect.__version__)"
	@test -x $(VENV)/bin/nats-server || { echo "nats-server missing from $(VENV)/bin" >&2; exit 1; }
	@$(PY) -c "from stem_polar.core import native; s = native.status(); print('stem-polar native kernels:', s); assert s == 'loaded', s"
	@$(PY) -c "from diff_sim_refiner.core import native; print('diff-sim-refiner native kernel:', native.build())"
	$(PY) -m ipykernel install --sys-prefix --name diffractflow --display-name "Python (diffractflow)" >/dev/null
	@$(PY) -m orchestration.embedded prefect-db-template | sed 's/^/Prefect database template: /'
	@touch $(READY)

test: setup
	@mkdir -p $(PREFECT_HOME)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 $(PYTEST_ARGS)

demo: setup
	@mkdir -p $(PREFECT_HOME)
	$(VENV)/bin/diffractflow demo all

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# JupyterLab on localhost with the project's kernel ("Python (diffractflow)") and the HDF5 viewer;
# the URL with its token is printed. LAB_PORT (default 8888), LAB_DIR (default notebooks/).
LAB_PORT ?= 8888
LAB_DIR  ?= $(CURDIR)/notebooks
lab: setup
	$(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --ServerApp.root_dir=$(CURDIR) \
	    --ServerApp.preferred_dir=$(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	-$(VENV)/bin/diffractflow down 2>/dev/null
	rm -rf $(VENV) .diffractflow
