"""Provision, Distill, Measure: the three harness-owned stages of a cell.

- **Provision** builds the method's :class:`~bench.method.DistillContext` from its declared data access
  and nothing else: NONE gets the dataset's metadata; ALT gets a loader for images of another source;
  FEW gets exactly its n training images, drawn with the cell's seed without reading a label (labels
  only when the method declares it reads them); FULL gets the training split. The validation and test
  splits never enter the context: they are *sealed* (:func:`seal`) in an object the runner holds and
  hands to the monitor's anytime curve and to the Measure stage. Nothing a method is handed (the
  context, the teacher view, the student) and no public attribute of a public module or of the active
  monitor refers to them, so a data-free row is data-free by construction. ``ctx.evaluate`` returns
  None, unless the method declares ``validation_feedback`` (it then selects on labelled validation
  data, and its row counts those images as real samples). (Python cannot stop code that goes looking in
  private attributes, closures or the garbage collector; that is deliberate cheating, not an accident a
  plugin author can make by reading the README.)
- **Distill** runs the method's one call under a :class:`~bench.monitor.Monitor` (compute, caps,
  anytime validation, checkpoints), with the teacher as the view of the method's declared teacher
  access (:mod:`bench.teacher_access`): top-1 labels, detached outputs, detached features, or the
  white-box module; more is refused with an error naming the declared access.
- **Measure** scores the student it hands back: final test accuracy (the headline), validation
  accuracy, params, FLOPs/MACs, and saves it (``student.pt`` + ``student.json``). Latency is measured
  later, once per architecture, in quiet (:mod:`bench.latency`).
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bench import monitor as monitor_module
from bench.data import ImageData, few_sample_indices
from bench import teacher_access
from bench.method import DataAccess, DistillContext, Method, TeacherAccess
from bench.metrics import count_flops, count_params, evaluate_accuracy, peak_memory_mb, reset_peak_memory
from bench.monitor import Budget, Clock, ComputeCapReached, Monitor, QueryCounter
from bench.students import Student
from bench.transforms import to_float

class _Scores:
    """One cell's sealed validation and test splits, and what the harness records from them.

    Made by :func:`seal` for the runner, handed to the Distill stage's monitor and the Measure stage; no
    object a method is handed refers to it. It records the anytime validation curve and a paper's
    best-on-test protocol, and returns an accuracy to the method's own evaluation points only when the
    method declares ``validation_feedback`` (its row then counts the validation images as real samples)."""

    __slots__ = ("_data", "_track_best", "_feedback", "_curve", "_best_test")

    def __init__(self, data: ImageData):
        self._data = data
        self._track_best = self._feedback = False
        self._curve: list[dict[str, float]] = []
        self._best_test: float | None = None

    def _accuracy(self, model: nn.Module, split: str) -> float | None:
        data = self._data
        x, y = (data.val_x, data.val_y) if split == "val" else (data.test_x, data.test_y)
        if x is None or x.shape[0] == 0:
            return None
        return evaluate_accuracy(model, x, y, lambda xb: to_float(xb, data.info))

    def configure(self, method: Method) -> None:
        self._track_best, self._feedback = method.tracks_best, method.validation_feedback

    def record_anytime(self, model: nn.Module, point: dict[str, float]) -> bool:
        """Add ``point`` (compute coordinates) with the model's validation accuracy to the curve; False
        without a validation split. Nothing is returned to the caller."""
        acc = self._accuracy(model, "val")
        if acc is None:
            return False
        self._curve.append({"val_acc": round(acc, 3), **point})
        return True

    def method_point(self, model: nn.Module) -> float | None:
        """The method's own evaluation point: best-on-test recorded for its paper's protocol; validation
        accuracy returned only to a method that declared ``validation_feedback``, else None."""
        if self._track_best:
            test = self._accuracy(model, "test")
            if test is not None:
                self._best_test = test if self._best_test is None else max(self._best_test, test)
        return self._accuracy(model, "val") if self._feedback else None

    def state(self) -> dict[str, Any]:
        return {"curve": list(self._curve), "best_test": self._best_test}

    def load_state(self, state: dict[str, Any]) -> None:
        self._curve, self._best_test = list(state["curve"]), state["best_test"]

    def curve(self) -> list[dict[str, float]]:
        return list(self._curve)

    def best_test(self) -> float | None:
        return self._best_test

    def validation_size(self) -> int:
        return 0 if self._data.val_x is None else int(self._data.val_x.shape[0])


def seal(data: ImageData) -> _Scores:
    """Seal ``data``'s validation and test splits for the harness's stages (the runner holds the result)."""
    return _Scores(data)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def provide(method: Method, data: ImageData, *, seed: int, device: torch.device, out_dir: Path, budget: Budget,
            amp: bool, data_root: Path | None, lineage=None, on_log=None, on_phase=None) -> DistillContext:
    """The method's context, holding exactly what its declared data access allows (see the module docstring)."""
    access = method.data_access
    train = few = None
    if access is DataAccess.FULL:
        train = (data.train_x, data.train_y)
    elif access is DataAccess.FEW:
        n = method.real_samples_limit(data.info)
        if n is not None:
            total = data.train_x.shape[0]
            if not 1 <= n <= total:
                raise ValueError(f"{method.name}: n_samples={n} must lie between 1 and the {total} training images")
            # a seeded draw that reads no label (the FSKD paper's "randomly selected" samples)
            idx = few_sample_indices(data.train_y.cpu(), n, seed=seed, stratified=False).to(data.train_x.device)
            few = (data.train_x[idx].clone(), data.train_y[idx].clone() if method.reads_labels() else None)
    return DistillContext(info=data.info, data_access=access, device=device, seed=seed, out_dir=out_dir,
                          budget=budget, amp=amp, data_root=data_root, train=train, few=few, lineage=lineage,
                          on_log=on_log, on_phase=on_phase)


@dataclass
class Outcome:
    """What the Distill stage hands to Measure (and the row)."""

    student: nn.Module
    seconds: float
    teacher_queries: int
    student_steps: int
    stopped_by: str  # "" (the method finished), or the cap that stopped it
    real_samples_used: int
    best_test: float | None
    anytime: list[dict[str, float]]
    iterations: int  # steps of every ctx.steps loop the method planned (its nominal length)
    amp_active: bool
    peak_mem_mb: float
    resumed_from: tuple[int, int] | None = None
    queries_by: str = ""  # the teacher queries by the purpose the method tagged (ctx.queries_for)


def distill(method: Method, teacher: nn.Module, student: Student, data: ImageData, *, sealed: _Scores, seed: int,
            device: torch.device, out_dir: Path, budget: Budget, amp: bool, data_root: Path | None,
            checkpoint_every: float = 0.0, on_log=None, on_phase=None,
            on_step: Callable[[int], None] | None = None, teacher_outputs: str = "logits") -> Outcome:
    """Run the method's one call under a monitor; returns the student it has when it ends or a cap stops it.

    The method receives the teacher as the view of its declared access (:mod:`bench.teacher_access`);
    ``teacher_outputs`` is what an ``outputs`` teacher returns ("logits" or "probs")."""
    info = data.info
    clock = Clock()
    example = torch.zeros(1, info.channels, info.image_size, info.image_size, device=device)
    counter = QueryCounter(teacher, example, budget, clock)
    ctx = provide(method, data, seed=seed, device=device, out_dir=out_dir, budget=budget, amp=amp,
                  data_root=data_root, lineage=student.lineage, on_log=on_log,
                  on_phase=(lambda name, total: on_phase(name, total, 0)) if on_phase else None)
    mon = Monitor(budget=budget, counter=counter, clock=clock, generator=ctx.generator,
                  scores=sealed,
                  coordinate="student_steps" if method.teacher_access in (TeacherAccess.NONE, TeacherAccess.WEIGHTS)
                  else "teacher_queries",
                  out_dir=out_dir, checkpoint_every=checkpoint_every,
                  on_phase=on_phase, on_step=on_step)
    sealed.configure(method)
    counted = teacher_access.teacher_view(method.teacher_access, teacher, counter, teacher_outputs)
    model = student.model
    monitor_module.activate(mon)
    reset_peak_memory(device)
    try:
        mon.track("student", model)
        try:
            returned = method.distill(counted, model, ctx)
            model = returned if returned is not None else mon.student
        except ComputeCapReached as stop:  # a cap hit inside a step: the student as it is
            mon.stopped_by = stop.which
            model = mon.student
        _sync(device)
        seconds = clock.elapsed()
        model = model.to(memory_format=torch.contiguous_format).eval()
        mon.tracked["student"] = model
        mon.finish()
        return Outcome(student=model, seconds=round(seconds, 3), teacher_queries=counter.count,
                       student_steps=mon.student_steps, stopped_by=mon.stopped_by or mon.cut_by,
                       real_samples_used=ctx.real_samples_used + (sealed.validation_size() if method.validation_feedback else 0),
                       best_test=sealed.best_test(), anytime=sealed.curve(),
                       iterations=sum(mon.phase_totals), amp_active=ctx.amp_active,
                       peak_mem_mb=round(peak_memory_mb(device), 1), resumed_from=mon.resumed_from,
                       queries_by=counter.breakdown())
    finally:
        teacher_access.release(counted)
        monitor_module.activate(None)
        counter.close()
        ctx.close()


def discard_checkpoint(out_dir: Path) -> None:
    (Path(out_dir) / monitor_module.CHECKPOINT_FILE).unlink(missing_ok=True)


def has_checkpoint(out_dir: Path) -> bool:
    return (Path(out_dir) / monitor_module.CHECKPOINT_FILE).is_file()


@dataclass
class Measurement:
    test_acc: float
    val_acc: float | None
    params: int
    flops: int
    macs: int
    extra: dict[str, Any] = field(default_factory=dict)


def measure(model: nn.Module, sealed: _Scores, input_shape: tuple[int, int, int]) -> Measurement:
    """Final test accuracy (the headline), validation accuracy, params and FLOPs/MACs of the returned student."""
    test = sealed._accuracy(model, "test")
    if test is None or not math.isfinite(test):
        raise FloatingPointError(f"student accuracy is {test}")
    val = sealed._accuracy(model, "val")
    flops, macs = count_flops(model, input_shape)
    return Measurement(test_acc=test, val_acc=val, params=count_params(model), flops=flops, macs=macs)


def save_student(model: nn.Module, record: dict[str, Any], folder: Path) -> None:
    """``student.pt`` (a plain state dict, for ``torch.load(weights_only=True)``) and ``student.json`` (how to
    rebuild the architecture: :func:`bench.students.rebuild_student`), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, write in (("student.pt", lambda p: torch.save(state, p)),
                        ("student.json", lambda p: Path(p).write_text(json.dumps(record, indent=1)))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
