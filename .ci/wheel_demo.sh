#!/usr/bin/env bash
# Packaging check: build the wheel, install it into a fresh virtualenv outside the checkout, and run the first-image
# demo there (a toy library, `compose ... --loras auto` on the default model, `compose judge` on the image).
# Usage: .ci/wheel_demo.sh [WORKDIR]   (PYTHON picks the interpreter; the default is python3). A WORKDIR named is
# kept; without one the check works in a temporary folder of its own and removes it on exit.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
if (($# >= 1)); then
  work="$1"
else
  # A folder of our own making is removed on exit: each run writes about 2 GB (a virtualenv with torch).
  work="$(mktemp -d -t lora-composer-wheel.XXXXXX)"
  trap 'rm -rf "$work"' EXIT
fi
max_wheel_mb=60
prompt="zorbex wearing a krwn crown in the snow"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
case "$work/" in "$repo"/*) echo "the work folder must lie outside the checkout: $work" >&2; exit 2 ;; esac

echo "== build the wheel"
# Built from a clean export of the tracked files, so nothing untracked (caches, venvs) can slip into it.
rm -rf "$work/src" "$work/dist"
mkdir -p "$work/src" "$work/dist"
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 tar cf -) | tar xf - -C "$work/src"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/lora_composer-*.whl)"
wheel_bytes=$(stat -c %s "$wheel")
echo "wheel: $(basename "$wheel"), $((wheel_bytes / 1024 / 1024)) MB"
if ((wheel_bytes > max_wheel_mb * 1024 * 1024)); then
  echo "the wheel is larger than $max_wheel_mb MB" >&2
  exit 1
fi

echo "== install it into a fresh virtualenv"
rm -rf "$work/venv"
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --no-cache-dir -c "$repo/constraints.txt" torch==2.13.0
"$py" -m pip install --quiet --no-cache-dir -c "$repo/constraints.txt" "$wheel"
if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
  echo "torchvision's compiled ops do not load with this torch: installing the import repair hook"
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp "$repo/.ci/torchvision_repair.py" "$site/_torchvision_repair.py"
  echo "import _torchvision_repair; _torchvision_repair.install()" > "$site/_torchvision_repair.pth"
fi

echo "== the demo, run outside the checkout"
rm -rf "$work/run"
mkdir -p "$work/run"
cd "$work/run"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export LORA_COMPOSER_CACHE="$work/run/cache"
unset PYTHONPATH LORA_COMPOSER_MODEL
"$py" -m composer.toyworld.library toy_library
"$work/venv/bin/compose" "$prompt" --loras auto --library toy_library --out out
# Exit 3 is the judge's reading (an asked attribute not found for sure), as in `make demo`; anything else fails.
"$work/venv/bin/compose" judge out/0-0.png || test $? -eq 3
echo "wheel demo passed: $(basename "$wheel") installed outside the checkout drew an image and the judge read it"
