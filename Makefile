# The book's two commands: `make book` and `make test`. Both create the virtual environment on first use.
# VENV may point elsewhere (CI keeps it in a cache folder keyed by the dependency list).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-pruning-book
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SIZE ?= default
JOBS ?= 2
FORCE ?=
# MathJax 3 served from the book itself, so formulas render with no network (npm registry's package).
MATHJAX_VERSION := 3.2.2
MATHJAX := _assets/mathjax/tex-chtml.js

.PHONY: book test test-units test-chapters setup data chapters html chapter clean

book: setup data chapters html  ## execute every chapter at its default size and build the HTML

# Two streams side by side (one per core), each one's output printed whole when it ends: the unit tests,
# and the chapters at smoke size followed by nbval on the executed copies.
test: setup data  ## unit tests, every chapter at smoke size (papermill), then nbval on the executed copies
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-units test-chapters

test-units:
	$(PY) -m pytest -p no:cacheprovider --durations=10 tests --ignore=tests/test_notebooks.py

test-chapters:
	$(PY) -m pytest -p no:cacheprovider --durations=10 tests/test_notebooks.py
	$(PY) -m pytest --nbval-lax -p no:cacheprovider build/smoke

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (pruning book)" >/dev/null
	@touch $@

# Fashion-MNIST: Debian's package where apt-get is available (as root), else torchvision's download, visibly.
data:
	@if [ -f $(FASHION) ]; then echo "Fashion-MNIST: $(FASHION)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST: no apt-get as root here; downloading it with torchvision"; \
		$(PY) -c "from pruning_utils import data; data.load('fashion-mnist', 'train', download=True); data.load('fashion-mnist', 'test', download=True)"; \
	fi

# Chapters run only when something they depend on changed (pruning_utils/chapters.py: the execution
# cache beside the checkpoint cache); FORCE=1 executes every one. JOBS chapters run side by side.
chapters:
	$(PY) -m pruning_utils.chapters --size $(SIZE) --jobs $(JOBS) $(if $(filter-out 0,$(FORCE)),--force) book/chapters

$(MATHJAX):
	@mkdir -p build/mathjax _assets
	cd build/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar xzf build/mathjax/mathjax-$(MATHJAX_VERSION).tgz -C build/mathjax
	rm -rf _assets/mathjax && cp -r build/mathjax/package/es5 _assets/mathjax

html: $(MATHJAX)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Re-run one chapter with its own parameters, e.g. make chapter NB=01_decision_tree_pruning ARGS="-p seed 1"
chapter: setup data
	$(VENV)/bin/papermill notebooks/$(NB).ipynb book/chapters/$(NB).ipynb -k python3 $(ARGS)

clean:
	rm -rf _build build book/chapters
