# The commands the README names. Everything lives in .venv/ inside the repo.
# `make lab`: set up and open the course.  `make test`: set up and run every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where to copy names.txt from (CI passes ../shared/data/names.txt); see data/README.md.
BACKPROP_NINJA_NAMES ?=
export BACKPROP_NINJA_NAMES

.PHONY: install install-test data lab formgrader test lint build build-check system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: a second run installs nothing unless pyproject.toml or constraints.txt changed.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

data: $(VENV)/.installed
	$(BIN)/backprop-ninja data

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=
# The folder `make lab` serves (the browser test serves a scratch copy).
LAB_ROOT ?= notebooks

# The learner's lab (backprop_ninja/lab/README.md): nbgrader's lab extension (its labconfig/) and
# server extensions (the flags) are off: no instructor tools, no Validate button; grade_me(), the
# last cell of each notebook, grades with the hidden tests. `cd grader && jupyter lab` keeps them.
NBGRADER_SERVER_OFF := $(foreach e,formgrader validate_assignment assignment_list course_list,\
	--ServerApp.jpserver_extensions=nbgrader.server_extensions.$(e)=False)

lab: data
	JUPYTER_CONFIG_PATH="$(CURDIR)/backprop_ninja/lab$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
		$(BIN)/jupyter lab --ServerApp.root_dir=$(LAB_ROOT) $(NBGRADER_SERVER_OFF) $(ALLOW_ROOT) $(LAB_ARGS)

# The instructor's view: nbgrader's formgrader on what `autograde --out $(OUT)` wrote ($(OUT)/course),
# with --allow-root when root; it prints the URL to open.
OUT ?= autograde-out
formgrader: $(VENV)/.installed
	$(BIN)/backprop-ninja formgrader $(OUT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check backprop_ninja tests benchmarks conftest.py

# Two pytest-xdist workers, a file on one worker (nbval's cells of a notebook share its kernel);
# conftest.py hands out the longest files first. `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder
test: install-test data lint
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests solutions --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

build: data
	$(BIN)/backprop-ninja build

build-check: data
	$(BIN)/backprop-ninja build --check

# Debian packages (root, as on CI; a no-op when present): bubblewrap, the sandbox every graded
# kernel runs in, and Chromium for the browser test.
system-deps:
	@command -v bwrap >/dev/null && command -v chromium >/dev/null || \
		{ apt-get update -q && apt-get install -y -q bubblewrap chromium chromium-driver; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
