# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install test demo bench clean readme

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement could pull a several-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/hpcdistill demo --out runs/demo

bench: install
	$(PY) bench/bench_shard.py
	$(PY) bench/bench_metrics.py

clean:
	rm -rf runs build *.egg-info

# Regenerate the README's CLI reference from the parser (tests/test_readme.py checks it).
readme: install
	$(PY) -c "import re, pathlib; from hpcdistill.cli import reference_markdown as r; p = pathlib.Path('README.md'); \
	p.write_text(re.sub(r'<!-- cli:start -->\n.*?<!-- cli:end -->', lambda m: '<!-- cli:start -->\n' + r() + '\n<!-- cli:end -->', p.read_text(), flags=re.S))"
