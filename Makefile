# twophase: the few commands a newcomer needs. Run `make help`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
export DVC_NO_ANALYTICS := 1
# DVC stages call `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

# The offline run: scikit-learn's bundled digits, no pretrained weights, small images.
DIGITS_PARAMS := -S data.dataset=digits -S data.image_size=32 -S model.weights=none \
	-S features.num_workers=0 \
	-S train_transfer.lr=0.001 -S train_transfer.epochs=30 \
	-S finetune.lr=0.0003 -S finetune.epochs=10
# --temp leaves params.yaml and the workspace alone; `make digits DIGITS_MODE=` runs in place.
DIGITS_MODE ?= --temp

# The columns worth comparing: the params people vary, both phases' test accuracy and macro F1.
EXP_COLUMNS := ^(Experiment|Created)$$|^(transfer|finetune)\.(accuracy|f1_macro)$$|^delta\.accuracy$$|^(data\.dataset|train_transfer\.lr|finetune\.lr|finetune\.epochs|finetune\.unfreeze)$$

.PHONY: help setup lock test pytest lint digits exp-show bench recipe docs

help:
	@echo "make setup   create $(VENV) and install twophase with pinned dependencies"
	@echo "make lock    resolve pyproject.toml's dependencies into constraints.txt (the pins)"
	@echo "make digits  run the whole DAG offline on digits as a DVC experiment (params.yaml untouched)"
	@echo "make test    lint, type-check and run the test suite (offline)"
	@echo "make lint    ruff and mypy only"
	@echo "make exp-show  dvc exp show limited to the params that vary and both phases' test scores"
	@echo "make bench   the benchmark of bench/run.py (tens of minutes; see bench/RESULTS.md)"
	@echo "make recipe R=strong  run recipes/strong.yaml as a DVC experiment (R= lists them)"
	@echo "make docs    serve the manual (docs/, mkdocs.yml) at http://127.0.0.1:8000"

# uv installs the pinned set (constraints.txt) by linking files from its cache: seconds where pip
# unpacks ~6 GB of wheels. compileall then byte-compiles on every core, all but the libraries'
# own test suites (a fifth of the source, never imported); a file that does not compile (a
# library's Python 2 sample) is skipped in silence, as pip and uv do.
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/python -m uv pip install --python $(BIN)/python --constraint constraints.txt \
	  --build-constraints constraints.txt -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 -x '/site-packages/.+/tests/' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true

# pyproject.toml's dependencies resolved into constraints.txt, keeping its pins where they still
# fit, for Linux x86-64 and every Python from 3.11.0; then make setup and make test.
lock:
	$(BIN)/python -m uv pip compile pyproject.toml --extra dev --output-file constraints.txt \
	  --python-version 3.11.0 --python-platform x86_64-unknown-linux-gnu \
	  --no-annotate --custom-compile-command "make lock"

digits:
	$(BIN)/dvc exp run $(DIGITS_MODE) $(DIGITS_PARAMS)
	$(MAKE) -s exp-show

exp-show:
	@$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_COLUMNS)' $(EXP_SHOW_ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src

# ruff and mypy (one core for half a minute) run beside the tests; either failing fails the target.
test:
	@$(MAKE) --no-print-directory -j 2 lint pytest

# One worker per core; a test file stays on one worker (the end-to-end files share a DVC project).
pytest:
	$(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder --durations=20

bench:
	$(BIN)/python bench/run.py

recipe:
ifeq ($(strip $(R)),)
	@$(BIN)/python scripts/recipe.py --list
else
	@$(BIN)/python scripts/recipe.py recipes/$(R).yaml >/dev/null
	set -f; $(BIN)/dvc exp run -n recipe-$(R) $(RECIPE_ARGS) $$($(BIN)/python scripts/recipe.py recipes/$(R).yaml)
endif

docs:
	$(BIN)/mkdocs serve
