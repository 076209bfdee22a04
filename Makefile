# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install test lint demo bench clean readme readme-demo lock gpu-check-prep

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement could pull a several-GB CUDA build. Every other package at the
# exact version in constraints.txt, so a fresh clone computes what the README shows.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# After a deliberate upgrade: record the venv's versions (then redo `make demo` and `make readme-demo`).
lock: install
	{ sed -n '1,/^[^#]/p' constraints.txt | grep '^#'; $(VENV)/bin/pip freeze --exclude-editable | grep -v '^#' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

# The lint gate first (format, lint, the import layers in pyproject.toml), then every test.
test: install lint
	$(PY) -m pytest --durations=15

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

demo: install
	$(VENV)/bin/hpcdistill demo --out runs/demo

# For bench/gpu_check.sh on a GPU machine without a package registry: its slides and shards (gpu-check-data/) and the
# wheels it lacks (.whl/), both ignored; copy the checkout with them and run `bash bench/gpu_check.sh` there.
gpu-check-prep: install
	$(PY) bench/gpu_check.py data gpu-check-data
	sed -n '/^# binary/,/^# pure/{/^[a-z]/p}' bench/gpu_wheels.txt > .whl-binary.txt
	sed -n '/^# pure/,$${/^[a-z]/p}' bench/gpu_wheels.txt > .whl-pure.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl -r .whl-binary.txt
	PYVIPS_BUILD_MODE=abi $(PY) -m pip wheel -q --no-deps -w .whl -r .whl-pure.txt
	rm -f .whl-binary.txt .whl-pure.txt
	ls .whl | grep -v -e '-none-any.whl$$' -e 'cp312' -e 'abi3' && { echo "gpu-check-prep: a wheel above is not for CPython 3.12"; exit 1; } || true

# The README's demo results (tables, ordering, times, versions, Figure 3) from the last `make demo` run, and the
# digest of the quick demo's numerics beside them (tests/integration/test_demo.py recomputes it).
readme-demo: install
	$(PY) docs/demo_section.py readme runs/demo
	$(VENV)/bin/hpcdistill demo --quick --out runs/demo-quick
	$(PY) docs/demo_section.py digest runs/demo-quick/experiment

bench: install
	$(PY) bench/bench_shard.py
	$(PY) bench/bench_metrics.py

clean:
	rm -rf runs build *.egg-info

# Regenerate the CLI reference (docs/cli.md) from the parser and the map of the tree (docs/architecture.md);
# tests/integration/test_readme.py checks both.
readme: install
	$(PY) -c "import re, pathlib; from hpcdistill.cli.main import reference_markdown as r; p = pathlib.Path('docs/cli.md'); \
	p.write_text(re.sub(r'<!-- cli:start -->\n.*?<!-- cli:end -->', lambda m: '<!-- cli:start -->\n' + r() + '\n<!-- cli:end -->', p.read_text(), flags=re.S))"
	$(PY) docs/architecture_map.py --write
