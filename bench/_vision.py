"""The one guarded place that imports torchvision and timm.

PyPI's torchvision wheels are compiled against one torch build. Beside a CPU-only torch of the same
version (torch 2.13.0 CPU with torchvision 0.28.0+cu130, as on this project's machines) the compiled
extension ``torchvision._C`` does not load, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not exist``:
that module registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, and a fake kernel needs the operator's schema. timm imports torchvision, so it fails
the same way.

Declaring those schemas ourselves (no kernels) before importing lets torchvision finish importing:
models, datasets and transforms work; ``torchvision.ops`` imports but its compiled operators (nms,
roi_align, deform_conv2d ...) stay unusable. On a normal install, where torch and torchvision match,
the first import succeeds and nothing here does anything.

The real fix is to install a torchvision that matches torch, with torch pinned so that pip does not
pull another torch: ``pip install torchvision -c constraints.txt`` (constraints.txt: ``torch==<version>``).

Keep the training and evaluation hot path free of torchvision; call :func:`import_torchvision` or
:func:`import_timm` where a model or dataset from them is needed.
"""
from __future__ import annotations

import functools
import re
import sys
from types import ModuleType

import torch

__all__ = ["import_timm", "import_torchvision"]

# Schemas of the torchvision operators that torchvision's Python code registers fake kernels for at
# import time, whatever happened to its compiled extension (torchvision/_meta_registrations.py).
# Copied from torchvision/csrc/ops/nms.cpp and csrc/ops/quantized/cpu/qnms_kernel.cpp.
_IMPORT_TIME_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

# The library that owns the declared schemas: it must stay alive for as long as the process runs,
# since a torch.library.Library deregisters its definitions when it is garbage-collected.
_SCHEMA_LIB: torch.library.Library | None = None

_FIX = (
    "Install a torchvision built for the installed torch {torch}, with torch pinned so that pip does "
    "not replace it: `echo torch=={torch} > constraints.txt && pip install torchvision timm -c constraints.txt` "
    "(for CPU-only torch use the CPU wheel index: --index-url https://download.pytorch.org/whl/cpu)."
)


def _fix_hint() -> str:
    return _FIX.format(torch=torch.__version__.split("+")[0])


def _forget(package: str) -> None:
    """Drop ``package`` and its submodules from sys.modules (left half-imported by a failed import)."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


def _has_torchvision_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except AttributeError:
        return False
    return True


def _declare_schemas(names: list[str]) -> None:
    """Define the schemas (no kernels) of the named torchvision operators that do not exist yet."""
    global _SCHEMA_LIB
    unknown = [n for n in names if n not in _IMPORT_TIME_SCHEMAS]
    if unknown:
        raise ImportError(
            f"torchvision's import needs operator(s) {unknown} whose schema bench._vision does not know "
            f"(known: {sorted(_IMPORT_TIME_SCHEMAS)}). {_fix_hint()}"
        )
    if _SCHEMA_LIB is None:
        _SCHEMA_LIB = torch.library.Library("torchvision", "DEF")
    for name in names:
        if not _has_torchvision_op(name):
            _SCHEMA_LIB.define(_IMPORT_TIME_SCHEMAS[name])


@functools.cache
def import_torchvision() -> ModuleType:
    """Import and return torchvision, working around a CUDA-built torchvision beside CPU-only torch.

    Raises:
        ImportError: torchvision is missing, or still fails to import; the message names the fix.
    """
    try:
        import torchvision
    except ModuleNotFoundError as exc:
        raise ImportError(f"torchvision is not installed. {_fix_hint()}") from exc
    except RuntimeError as exc:
        if _MISSING_OP.search(str(exc)) is None:
            raise ImportError(f"`import torchvision` failed: {exc}. {_fix_hint()}") from exc
        first_error = exc
    else:
        return torchvision

    # The compiled extension did not load (torchvision built for another torch). Declare the schemas
    # that torchvision's import-time registrations need, then import again from scratch.
    _forget("torchvision")
    _declare_schemas(list(_IMPORT_TIME_SCHEMAS))
    try:
        import torchvision
    except RuntimeError as exc:
        _forget("torchvision")
        raise ImportError(
            f"`import torchvision` failed ({first_error}) and still fails after declaring the schemas of "
            f"{sorted(_IMPORT_TIME_SCHEMAS)}: {exc}. {_fix_hint()}"
        ) from exc
    return torchvision


@functools.cache
def import_timm() -> ModuleType:
    """Import and return timm (which imports torchvision) through :func:`import_torchvision`.

    Raises:
        ImportError: timm is missing or fails to import; the message names the fix.
    """
    import_torchvision()
    try:
        import timm
    except ModuleNotFoundError as exc:
        raise ImportError(f"timm is not installed: `pip install timm -c constraints.txt`. {_fix_hint()}") from exc
    except RuntimeError as exc:
        _forget("timm")
        raise ImportError(f"`import timm` failed: {exc}. {_fix_hint()}") from exc
    return timm
