"""Install-time repair for a torchvision wheel whose compiled ops cannot load next to the CPU torch.

The only torchvision 0.28.0 wheel in reach is a CUDA build. With the CPU torch its `_C` extension fails
to load, and torchvision's fake-kernel registrations then raise ``operator torchvision::nms does not
exist``, which also breaks transformers, diffusers and peft (they import torchvision lazily).

This module is copied into the virtualenv's site-packages with a ``.pth`` line that calls
:func:`install`. It adds a meta-path finder that acts once, the first time ``torchvision`` is imported:
if the compiled ops load, it does nothing; otherwise it declares the two op schemas torchvision
registers fakes for, so the pure-Python parts import cleanly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import pathlib
import sys

_LIBRARIES: list[object] = []


def _compiled_ops_load(package_dir: pathlib.Path) -> bool:
    import torch

    for candidate in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(candidate))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def _declare_schemas() -> None:
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)


class _TorchvisionRepairFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            package_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
            if not _compiled_ops_load(package_dir):
                _declare_schemas()
        return spec


def install() -> None:
    """Register the one-shot finder (idempotent)."""
    if not any(isinstance(f, _TorchvisionRepairFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionRepairFinder())
