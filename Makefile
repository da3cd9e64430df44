# LoRA Composer — `make demo` and `make test` each install first when the venv is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export LORA_COMPOSER_CACHE ?= $(CURDIR)/.cache/lora-composer

.PHONY: install demo app test test-gpu bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt .ci/torchvision_repair.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@if ! $(PY) -c "import torchvision" >/dev/null 2>&1; then \
		echo "torchvision's compiled ops do not load with this torch: installing the import repair hook"; \
		site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
		cp .ci/torchvision_repair.py "$$site/_torchvision_repair.py"; \
		echo "import _torchvision_repair; _torchvision_repair.install()" > "$$site/_torchvision_repair.pth"; \
		$(PY) -c "import torchvision, diffusers, peft, open_clip" ; \
	fi
	touch $(STAMP)

DEMO_LIBRARY := examples/toy_library
DEMO_PROMPT := zorbex wearing a hat in the snow, pxlart pixel art

demo: install
	$(PY) -m composer.toyworld.library $(DEMO_LIBRARY)
	$(VENV)/bin/compose index $(DEMO_LIBRARY)
	$(VENV)/bin/compose "$(DEMO_PROMPT)" --loras auto --library $(DEMO_LIBRARY) --model toy-sd --method merge --out out/demo
	$(VENV)/bin/compose judge out/demo/0-0.png

app: install
	$(PY) -m composer.toyworld.library $(DEMO_LIBRARY)
	$(VENV)/bin/compose app --library $(DEMO_LIBRARY) --model toy-sd

# Two workers (one torch thread each, see tests/conftest.py): 6 min 49 s in one process on 2 cores, 3 min 53 s in two.
# Whole test files go to one worker, so module fixtures are built once.
test: install
	$(PY) -m pytest -m "not gpu" -q -n 2 --dist loadfile

test-gpu: install
	$(PY) -m pytest -m gpu -q

bench: install
	$(PY) -m benchmarks

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
