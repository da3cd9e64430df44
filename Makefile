# LoRA Composer — `make demo` and `make test` each install first when the venv is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export LORA_COMPOSER_CACHE ?= $(CURDIR)/.cache/lora-composer

.PHONY: install demo app test test-gpu gpu-check bench fuzz quality lint format clean

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
DEMO_PROMPT := zorbex wearing a krwn crown in the snow

demo: install
	$(PY) -m composer.toyworld.library $(DEMO_LIBRARY)
	$(VENV)/bin/compose index $(DEMO_LIBRARY)
	$(VENV)/bin/compose "$(DEMO_PROMPT)" --loras auto --library $(DEMO_LIBRARY) --model toy-sd --method merge --out out/demo
	@# The judge's verdict is the demo's last word: exit 3 (an asked attribute not found for sure, or unsure) is a
	@# reading, not a failure of the demo; any other failure still stops make.
	$(VENV)/bin/compose judge out/demo/0-0.png || test $$? -eq 3

app: install
	$(PY) -m composer.toyworld.library $(DEMO_LIBRARY)
	$(VENV)/bin/compose app --library $(DEMO_LIBRARY) --model toy-sd

# Two workers (one torch thread each, see tests/conftest.py) that steal tests from each other when one runs dry: the
# long test files end together (worksteal is about 6% faster than whole files per worker on 2 cores).
test: install
	$(PY) -m pytest -m "not gpu" -q -n 2 --dist worksteal

test-gpu: install
	$(PY) -m pytest -m gpu -q

# One prepared check on a GPU (<= 8 min on one H100, model builds included): the gpu tests, then ours vs diffusers on
# SD-1.5-, SDXL- and FLUX-shaped models; writes out/gpu-check/gpu_check.{json,md}. CI runs it on the CPU with
# GPU_CHECK_FLAGS="--device cpu --quick" (tiny presets, about a minute on 2 cores).
GPU_CHECK_FLAGS ?=
gpu-check: install
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_FLAGS) > /dev/null

bench: install
	$(PY) -m benchmarks

# The fuzz campaign: 500 mutated adapter files and sidecars, 300 command lines, 700 app routes, one torch thread;
# prints a table by outcome and exits 1 on any traceback, hang, NaN image or read outside the library.
fuzz: install
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.fuzz --files 500 --cli 300 --routes 700 --seed 1 --threads 1

# Every table and grid of the toy world's quality benchmark from the shipped files, with the flags of the published
# docs: two lanes of one torch thread each (each its own library folder); on the 2-core CPU machine of
# docs/benchmarks.md the lanes take about 8,000 s and 7,000 s of drawing for the composition tables.
# Rerun it whole after any library file or the gates change; docs/benchmarks.md says what each table measured.
# Drawn images are kept in .cache/bench/images under a fingerprint of the code and weights that drew them, so a rerun
# after a change to the judge alone re-reads them and only judges (minutes, not hours).
QUALITY = $(PY) -m benchmarks.composition_quality --sets 5 --seeds 3 --every-set-k 2 --steps 20 --threads 1 --docs docs \
	--image-cache .cache/bench/images
LANE_A = $(QUALITY) --library .cache/bench/lane_a
LANE_B = $(QUALITY) --library .cache/bench/lane_b

quality: install
	mkdir -p .cache/bench
	$(PY) -m benchmarks.judge_ceiling --docs docs > /dev/null
	( $(LANE_A) --alone-images 32 --alone-branches mixed \
	  && $(LANE_A) --compositions-only --branches mixed --name composition_quality_mixed \
	  && $(LANE_A) --alone-only --alone-branches shared --alone-seed 2026 --name composition_quality_alone_fresh \
	) > .cache/bench/lane_a.log & lane_a=$$!; \
	( $(LANE_B) --compositions-only --branches conditional --name composition_quality_cond \
	  && $(LANE_B) --extra-only --branches shared --alone-branches shared --name composition_quality_shared \
	  && $(LANE_B) --alone-only --alone-branches shared --alone-seed 4242 --alone-images 64 \
	     --name composition_quality_alone_third \
	  && $(LANE_B) --compositions-only --methods "" --default-path plain --sets 24 \
	     --name composition_quality_default \
	) > .cache/bench/lane_b.log; lane_b=$$?; wait $$lane_a && test $$lane_b = 0

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) .ci/history_lint.py

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
