"""``bench export``: a cell's student as a deployable file, checked against the student itself.

Formats: ``torchscript`` (``torch.jit.trace``; load with ``torch.jit.load``, no dfkd-bench needed) and
``onnx`` (the TorchScript-based ``torch.onnx.export`` with a dynamic batch axis; needs the ``onnx``
package, and ``onnxruntime`` to check it: ``pip install 'dfkd-bench[export]'``). The export is traced at
batch 2 and checked at batch 8 on seeded N(0, 1) inputs (the student's normalised input space), so a
shape baked into the trace is caught; the largest absolute logit difference must stay within
``atol + rtol * max|logit|``. Beside the file, ``<file>.json`` says what the model expects: input
shape, classes, and the normalisation ``(x / 255 - mean) / std`` to apply to uint8 images.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.config import ConfigError

FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}
ATOL, RTOL = 1e-4, 1e-5


@dataclass
class Exported:
    path: Path
    max_abs_diff: float
    tolerance: float
    meta: dict

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _inputs(shape: tuple[int, int, int], batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, check: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice: the format itself still loads everywhere
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        return loaded(check)


def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` as ONNX to ``path``: the TorchScript-based exporter traced on ``example``, input ``input`` and
    output ``logits`` with a dynamic batch axis. The one export path of ``bench export`` and of the ONNX Runtime
    latency timing (:mod:`bench.latency`), so the timed graph is the deployed one. Needs the ``onnx`` package."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, check: torch.Tensor) -> torch.Tensor:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs the {' and '.join(missing)} package(s) (onnxruntime checks the export): "
                          "pip install onnx onnxruntime -c constraints.txt (or pip install 'dfkd-bench[export]'); "
                          "--format torchscript needs nothing more")
    import onnxruntime

    write_onnx(model, example, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": check.numpy()})[0])


EXPORTERS = {"torchscript": _torchscript, "onnx": _onnx}


def export_student(cell_dir: Path, fmt: str, out: Path | None = None) -> Exported:
    """Export the student saved in ``cell_dir`` as ``fmt`` to ``out`` (default ``<cell_dir>/student<.ts|.onnx>``)."""
    from bench.runner import load_saved_student

    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")
    model = load_saved_student(cell_dir)
    if model is None:
        raise ConfigError(f"{cell_dir} holds no saved student (student.pt + student.json): give the folder of a "
                          f"finished cell, results/<grid>/cells/<cell_id>")
    record = json.loads((cell_dir / "student.json").read_text())
    shape = (int(record["channels"]), int(record["image_size"]), int(record["image_size"]))
    model = model.cpu().eval()
    path = Path(out) if out is not None else cell_dir / f"student{FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    check = _inputs(shape, 8, seed=1)
    exported = EXPORTERS[fmt](model, _inputs(shape, 2, seed=0), path, check)
    with torch.no_grad():
        reference = model(check)
    diff = float((exported.float() - reference).abs().max())
    tolerance = ATOL + RTOL * float(reference.abs().max())
    meta = {"format": fmt, "file": path.name, "input_shape": [None, *shape], "num_classes": int(record["num_classes"]),
            "student": record["spec"], "cell": cell_dir.name,
            "preprocess": "x = (uint8_image / 255 - mean) / std, per channel" if "mean" in record else
                          "normalise as the cell's dataset (see its config.json)",
            "mean": record.get("mean"), "std": record.get("std"), "max_abs_diff": diff, "tolerance": tolerance}
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1))
    return Exported(path, diff, tolerance, meta)
