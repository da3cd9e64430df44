"""Run every benchmark module's quick mode (``python -m benchmarks``) and print their JSON as one document.

Modules are discovered in this package (names starting with ``_`` are skipped) and each runs in its own
process, so one benchmark's imports, caches or crash cannot skew or stop another.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import time
from typing import Any

import benchmarks


def discover() -> list[str]:
    """Names of the benchmark modules in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def run_quick(name: str) -> dict[str, Any]:
    """Run ``python -m benchmarks.NAME --quick`` and return its JSON document (or the failure)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"error": f"exit code {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        return {"error": f"output is not one JSON document ({exc})", "stdout_tail": done.stdout[-2000:]}
    return {"result": document, "wall_s": round(time.perf_counter() - start, 3)}


def main() -> int:
    """Run all quick benchmarks; exit 1 when any failed."""
    results = {name: run_quick(name) for name in discover()}
    json.dump({"benchmarks": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
