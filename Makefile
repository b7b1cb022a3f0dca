# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the whole story on the embedded dataset (no downloads)
#   make test   set up .venv, then run ruff, pytest and the notebooks under nbval (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
export DINOKIT_PROFILE ?= cpu-demo

.PHONY: setup demo assignment student test lint lab pretrain bench report video notebooks clean help

help:
	@echo "make demo | test | assignment | student | lint | lab | pretrain | bench | report | video | notebooks | clean"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dinokit demo

assignment: $(STAMP)
	$(BIN)/dinokit assignment $(ARGS)

# The students' notebooks: exercise solutions replaced by stubs (nbgrader), in release/notebooks/.
student: $(STAMP)
	$(BIN)/dinokit student

pretrain: $(STAMP)
	$(BIN)/dinokit pretrain --preset $(DINOKIT_PROFILE)

bench: $(STAMP)
	$(BIN)/dinokit bench --preset cpu-quick

report: $(STAMP)
	$(BIN)/dinokit report

video: $(STAMP)
	$(BIN)/dinokit video

lint: $(STAMP)
	$(BIN)/ruff check dinokit tests benchmarks
	$(BIN)/ruff format --check dinokit tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check dinokit tests benchmarks
	DINOKIT_PROFILE=ci $(BIN)/python -m pytest tests notebooks --nbval-lax --durations=10 -q

# Execute all six notebooks on the current profile and keep them as HTML (linked from the report).
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=-1 \
		--output-dir report/notebooks notebooks/0*.ipynb
	$(BIN)/dinokit report

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf runs data/embedded-har-* data/splits report/figures report/report.html report/notebooks release .pytest_cache
