"""The harness's side of a cell's Distill stage: compute, caps, anytime validation, in-cell checkpoints.

While a method runs, the runner installs one :class:`Monitor` as the *active* monitor of the process
(:func:`activate`). The method's context (:class:`bench.method.DistillContext`) reaches it only through
:func:`active`, so the monitor is never an attribute of anything a method is handed:

- **Compute.** Teacher queries (images through the teacher, counted by a hook on its input layer, so
  that forwards through ``teacher.module`` count too), student steps (the steps of
  :meth:`DistillContext.steps` phases that train the student) and seconds (wall time of the method,
  without the harness's evaluations and checkpoints).
- **Caps.** A cell's budget may cap any of the three (:class:`Budget`). ``ctx.steps`` ends its loop
  before a step would cross a cap; the teacher hook refuses a query that would cross a teacher-query
  cap (or any query past a seconds cap) by raising :class:`ComputeCapReached`, which the runner treats
  as a clean stop: the student is measured as it is.
- **Anytime curves.** At compute checkpoints spaced geometrically (a factor sqrt 2) in teacher queries
  (student steps for methods that never query the teacher) the student is evaluated on the validation
  split; the points go to the cell's curve with their teacher queries, student steps and seconds.
  Nothing is returned to the method, and the curve is kept by the sealed splits, not on the monitor.
- **Best-on-test** for methods whose paper protocol reports it (``tracks_best``): recorded at the
  method's own evaluation points, never returned.
- **In-cell checkpoints** every ``checkpoint_every`` seconds: the tracked state (student, generator,
  optimisers, schedulers, batch streams, pools), every random generator, the counters, the curve's
  length. After a kill the next run resumes the cell from its last checkpoint; on the same machine and
  thread count, with MKL in its reproducible mode (``MKL_CBWR=COMPATIBLE``), it ends exactly where the
  uninterrupted run would. Without it MKL's sgemm rounds by the buffers' memory alignment, which differs
  between processes, so two uninterrupted CPU runs can already differ in the last bits
  (tests/test_budget.py's resume test sets it).

The validation and test images are not held here: the monitor hands the student to the sealed splits
of :func:`bench.provision.seal`, which record and return nothing to it.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from bench.config import ConfigError

_ACTIVE: "Monitor | None" = None
QUERY_BASE = 256  # first anytime checkpoint, in teacher queries; then x sqrt(2) each
STEP_BASE = 4  # the same in student steps, for methods that never query the teacher
CHECKPOINT_FILE = "checkpoint.pt"


class ComputeCapReached(Exception):
    """A cell's compute cap was reached inside a method: the harness stops it and measures the student."""

    def __init__(self, which: str):
        super().__init__(f"compute cap reached: {which}")
        self.which = which


@dataclass(frozen=True)
class Budget:
    """How much compute a cell gets: a fraction of the method's paper budget and optional caps.

    ``fraction`` scales the paper's iteration counts (``ctx.scaled``); the caps stop the method when
    the first is reached: ``teacher_queries`` (images through the teacher), ``seconds`` (the method's
    wall time) or ``student_steps`` (steps of its student-training loops)."""

    fraction: float = 1.0
    teacher_queries: int | None = None
    seconds: float | None = None
    student_steps: int | None = None

    def validate(self) -> None:
        if not 0 < self.fraction <= 10:
            raise ConfigError(f"fraction must be in (0, 10], got {self.fraction}")
        for name in ("teacher_queries", "seconds", "student_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    @property
    def caps(self) -> dict[str, float]:
        return {k: v for k in ("teacher_queries", "seconds", "student_steps") if (v := getattr(self, k)) is not None}

    def describe(self) -> str:
        parts = [] if self.fraction == 1.0 and self.caps else [f"{self.fraction:g} of the paper budget"]
        parts += [f"{v:g} {k.replace('_', ' ')}" for k, v in self.caps.items()]
        return ", ".join(parts)


class Clock:
    """Wall seconds of the method, without the harness's pauses (evaluations, checkpoints)."""

    def __init__(self, offset: float = 0.0):
        self.started = time.perf_counter()
        self.paused = 0.0
        self.offset = offset  # seconds spent before a resume

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.paused + self.offset

    def pause(self):
        clock = self

        class _Pause:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.paused += time.perf_counter() - self.t

        return _Pause()


class QueryCounter:
    """Counts images through the teacher with a forward pre-hook on its input layer; enforces the caps."""

    def __init__(self, teacher: nn.Module, example: torch.Tensor | None = None, budget: Budget | None = None,
                 clock: Clock | None = None):
        budget = budget or Budget()
        self.count = 0
        self.purpose = ""  # what the current queries are for (DistillContext.queries_for); "" = untagged
        self.by_purpose: dict[str, int] = {}
        self.limit = budget.teacher_queries
        self.seconds = budget.seconds
        self.clock = clock or Clock()
        self.enforce = True
        self.stem = _input_layer(teacher, example)
        self._handle = self.stem.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        n = int(inputs[0].shape[0])
        if self.enforce:
            if self.limit is not None and self.count + n > self.limit:
                raise ComputeCapReached("teacher_queries")
            if self.seconds is not None and self.clock.elapsed() >= self.seconds:
                raise ComputeCapReached("seconds")
        self.count += n
        if self.purpose:
            self.by_purpose[self.purpose] = self.by_purpose.get(self.purpose, 0) + n

    def breakdown(self) -> str:
        """``"generator:N student:M"``: the tagged queries by purpose ("" when none was tagged)."""
        return " ".join(f"{k}:{v}" for k, v in sorted(self.by_purpose.items()))

    def close(self) -> None:
        self._handle.remove()


def _input_layer(model: nn.Module, example: torch.Tensor | None) -> nn.Module:
    """The first leaf module with parameters that the input reaches (a network's stem); without an
    example input, the first such module in definition order."""
    leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    if example is None:
        if not leaves:
            raise ValueError(f"{type(model).__name__} has no layer with parameters to count teacher queries on")
        return leaves[0]
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, i: order.append(m)) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no layer with parameters to count teacher queries on")
    return order[0]


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "ctx": generator.get_state(), "python": _plain(random.getstate()),
             "numpy": _plain(np.random.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["ctx"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Numpy arrays and tuples as lists: what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _state_of(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if torch.is_tensor(obj):
        with torch.no_grad():
            obj.copy_(state.to(obj.device))
    else:
        obj.load_state_dict(state)


class Monitor:
    """One cell's compute accounting, caps, anytime evaluations and checkpoints (see the module docstring)."""

    def __init__(self, *, budget: Budget, counter: QueryCounter, clock: Clock, generator: torch.Generator,
                 scores: Any, coordinate: str, out_dir: Path, checkpoint_every: float = 0.0,
                 on_phase: Callable[[str, int, int], None] | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.budget = budget
        self.counter = counter
        self.clock = clock
        self.generator = generator
        self._scores = scores  # provision's sealed splits: records the curve and best-on-test, returns nothing
        self.coordinate = coordinate  # "teacher_queries" or "student_steps"
        self.out_dir = Path(out_dir)
        self.checkpoint_every = checkpoint_every
        self.on_phase, self.on_step = on_phase, on_step
        self.tracked: dict[str, Any] = {}
        self.student_steps = 0
        self.phase = -1
        self.evaluations = 0  # anytime points recorded (the curve itself is the harness's, not the monitor's)
        self.next_threshold = 0.0
        self.stopped_by: str = ""  # the cap that ended a loop early (or raised inside a step)
        self.cut_by: str = ""  # the cap that shortened a planned length (plan_steps)
        self.phase_totals: list[int] = []
        self._last_save = time.perf_counter()
        self._resume: dict[str, Any] | None = self._read_checkpoint()
        self.resumed_from: tuple[int, int] | None = None

    # ---- state the method registers
    def track(self, name: str, obj: Any) -> None:
        if not (torch.is_tensor(obj) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"))):
            raise TypeError(f"ctx.track({name}=...): a {type(obj).__name__} cannot be checkpointed; track modules, "
                            f"optimisers, schedulers, batch streams, pools or tensors (anything with "
                            f"state_dict/load_state_dict)")
        self.tracked[name] = obj
        if self._resume is not None and name in self._resume["states"]:
            _load_into(obj, self._resume["states"][name])

    @property
    def student(self) -> nn.Module | None:
        return self.tracked.get("student")

    # ---- the step loop
    def plan(self, total: int, queries_per_step: float | None = None) -> int:
        """``total`` steps cut to what fits under the step and (given the cost per step) query caps."""
        total = max(1, int(total))
        if self.budget.student_steps is not None:
            left = max(1, int(self.budget.student_steps) - self.student_steps)
            if left < total:
                total, self.cut_by = left, "student_steps"
        if self.budget.teacher_queries is not None and queries_per_step:
            left = max(1, int((self.budget.teacher_queries - self.counter.count) // queries_per_step))
            if left < total:
                total, self.cut_by = left, "teacher_queries"
        return total

    def steps(self, total: int, name: str, student: bool, log_every: int) -> Iterator[int]:
        self.phase += 1
        self.phase_totals.append(total)
        first = 1
        if self._resume is not None:
            if self.phase < self._resume["phase"]:
                return  # finished before the checkpoint: its results were restored with the tracked state
            if self.phase == self._resume["phase"]:
                first = self._restore()
        if self.on_phase is not None:
            self.on_phase(name, total, first - 1)
        if not self.evaluations:
            self._evaluate_anytime()  # the student as the method received it
        cost = 0
        for step in range(first, total + 1):
            stop = self._cap_reached(cost, student)
            if stop:
                self.stopped_by = stop
                break
            before = self.counter.count
            yield step
            cost = self.counter.count - before
            if student:
                self.student_steps += 1
            if self.on_step is not None:
                self.on_step(step)
            self._maybe_evaluate()
            self._maybe_checkpoint(step)

    def _cap_reached(self, next_cost: int, student: bool) -> str:
        b = self.budget
        if b.student_steps is not None and student and self.student_steps >= b.student_steps:
            return "student_steps"
        if b.teacher_queries is not None and self.counter.count + next_cost > b.teacher_queries:
            return "teacher_queries"
        if b.seconds is not None and self.clock.elapsed() >= b.seconds:
            return "seconds"
        return ""

    # ---- anytime evaluation
    def _value(self) -> float:
        return float(self.counter.count if self.coordinate == "teacher_queries" else self.student_steps)

    def _maybe_evaluate(self) -> None:
        if self._value() >= self.next_threshold:
            self._evaluate_anytime()

    def _evaluate_anytime(self, final: bool = False) -> None:
        model = self.student
        if model is None:
            return
        point = {"teacher_queries": self.counter.count, "student_steps": self.student_steps,
                 "seconds": round(self.clock.elapsed(), 3)}
        if final:
            point["final"] = 1
        with self.clock.pause():
            recorded = self._scores.record_anytime(model, point)
        if not recorded:  # no validation split (validation: 0)
            self.next_threshold = math.inf
            return
        self.evaluations += 1
        base = QUERY_BASE if self.coordinate == "teacher_queries" else STEP_BASE
        value = self._value()
        k = 0 if value < base else math.floor(2 * math.log2(value / base)) + 1
        self.next_threshold = base * math.sqrt(2) ** k

    def method_evaluation(self, model: nn.Module) -> float | None:
        """The method's own evaluation point (see ``provision._Scores.method_point``), off the method's clock."""
        with self.clock.pause():
            return self._scores.method_point(model)

    def finish(self) -> None:
        """The last anytime point, on the student the method handed back (or had when a cap stopped it)."""
        self.counter.enforce = False
        self._evaluate_anytime(final=True)

    # ---- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = self.checkpoint_path
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged checkpoint (killed mid-write cannot happen: writes are atomic): start over
            path.unlink(missing_ok=True)
            return None

    def _maybe_checkpoint(self, step: int) -> None:
        if self.checkpoint_every and time.perf_counter() - self._last_save >= self.checkpoint_every:
            self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> None:
        with self.clock.pause():
            curve = self.out_dir / "curve.jsonl"
            state = {"phase": self.phase, "step": step, "student_steps": self.student_steps,
                     "queries": self.counter.count, "queries_by": dict(self.counter.by_purpose), "seconds": self.clock.elapsed(), "scores": self._scores.state(),
                     "evaluations": self.evaluations, "next_threshold": self.next_threshold,
                     "curve_bytes": curve.stat().st_size if curve.exists() else 0,
                     "states": {name: _state_of(obj) for name, obj in self.tracked.items()},
                     "rng": _rng_state(self.generator)}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".checkpoint.", suffix=".tmp")
            os.close(fd)
            try:
                torch.save(state, tmp)
                os.replace(tmp, self.checkpoint_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self._last_save = time.perf_counter()

    def _restore(self) -> int:
        """Resume inside the current phase: counters, RNGs and the curve as they were at the checkpoint."""
        state, self._resume = self._resume, None
        assert state is not None
        self.student_steps = int(state["student_steps"])
        self.counter.count = int(state["queries"])
        self.counter.by_purpose = dict(state.get("queries_by", {}))
        self.clock.offset = float(state["seconds"])
        self.clock.started, self.clock.paused = time.perf_counter(), 0.0
        self._scores.load_state(state["scores"])
        self.evaluations = int(state["evaluations"])
        self.next_threshold = float(state["next_threshold"])
        for name, obj in self.tracked.items():  # state tracked before this phase began is current again
            if name in state["states"]:
                _load_into(obj, state["states"][name])
        _set_rng_state(state["rng"], self.generator)
        curve = self.out_dir / "curve.jsonl"
        if curve.exists():
            with open(curve, "r+b") as f:
                f.truncate(int(state["curve_bytes"]))
        self.resumed_from = (self.phase, int(state["step"]))
        return int(state["step"]) + 1

    def discard_checkpoint(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)

    @property
    def resuming(self) -> bool:
        return self._resume is not None


def activate(monitor: Monitor | None) -> None:
    """Install ``monitor`` as the process's active monitor (None: none)."""
    global _ACTIVE
    _ACTIVE = monitor


def active() -> Monitor | None:
    """The active monitor, if a cell is distilling in this process."""
    return _ACTIVE
