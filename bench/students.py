"""Student specs: an architecture name from the model zoo, or a student derived from the teacher.

A derived student is written ``<kind>:<args>`` (e.g. ``pruned:l1:0.5``), its kind registered in
:data:`bench.lineage.STUDENT_KINDS`; anything else is a model name for :func:`bench.models.create_model`
(including ``timm:<name>`` and ``torchvision:<name>``). :func:`build_student` returns a :class:`Student`:
the module and, for a derived one, its :class:`~bench.lineage.Lineage`.

Every built student can be rebuilt without its teacher's weights from :meth:`Student.record` (what a
cell saves as ``student.json`` beside ``student.pt``): a zoo model by name; a pruned one by replaying
its pruning history on a fresh copy of the teacher architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import bench.pruning  # noqa: F401  (registers the derived student kind "pruned")
import bench.evolution  # noqa: F401  (registers the pruning criterion "evo")
from bench.config import ConfigError
from bench.data import DatasetInfo
from bench.lineage import STUDENT_KINDS, Lineage, StudentContext
from bench.models import MODELS, architecture_code, create_model
from bench.provenance import modules_hash

__all__ = ["Student", "StudentContext", "build_student", "check_compatible", "check_spec", "is_derived", "rebuild_student"]


@dataclass
class Student:
    model: nn.Module
    lineage: Lineage | None = None  # how it was derived from the teacher (None: a zoo architecture)

    def record(self, spec: str, info: DatasetInfo) -> dict[str, Any]:
        """What :func:`rebuild_student` needs to rebuild this architecture (no weights)."""
        return {"spec": spec, "num_classes": info.num_classes, "channels": info.channels,
                "image_size": info.image_size, "lineage": self.lineage.to_json() if self.lineage else None}


def _derived_kind(spec: str):
    """``(StudentKind, args)`` for ``<kind>:<args>`` with a registered kind, else ``(None, spec)``."""
    kind, sep, _ = spec.partition(":")
    if sep and STUDENT_KINDS.has_prefix(kind):
        return STUDENT_KINDS.resolve(spec)
    return None, spec


def is_derived(spec: str) -> bool:
    """True for ``<kind>:<args>`` students built from the teacher (cached per teacher)."""
    return _derived_kind(spec)[0] is not None


def check_spec(spec: str, where: str = "student") -> None:
    """Raise :class:`ConfigError` unless ``spec`` names a model or a registered derived kind."""
    kind, args = _derived_kind(spec)
    if kind is not None:
        if kind.validate is not None:
            try:
                kind.validate(args)
            except ValueError as exc:
                raise ConfigError(f"{where}: {spec!r}: {exc}") from None
        return
    if spec in MODELS:
        return
    raise ConfigError(f"{where}: unknown student {spec!r}; valid: "
                      f"{', '.join(MODELS.names(open_forms=True) + STUDENT_KINDS.names(open_forms=True))}")


def student_code(spec: str) -> str:
    """A hash of the code that builds student ``spec``: a zoo model's architecture code, or a derived kind's
    modules (for ``pruned:``: the pruning module and the criterion's)."""
    kind, args = _derived_kind(spec)
    if kind is None:
        return architecture_code(spec)
    return modules_hash(kind.code(args) if kind.code is not None else ())


def build_student(spec: str, ctx: StudentContext) -> Student:
    """A fresh student for ``spec`` on ``ctx.device``, in train mode."""
    kind, args = _derived_kind(spec)
    if kind is not None:
        model, lineage = kind.build(args, ctx)
    else:
        model, lineage = create_model(spec, ctx.info.num_classes, ctx.info.channels, ctx.info.image_size), None
    return Student(model.to(ctx.device).train(), lineage)


def rebuild_student(record: dict[str, Any]) -> nn.Module:
    """The (untrained) architecture of a saved student from its :meth:`Student.record`."""
    from bench.pruning import rebuild_from_lineage

    lineage = record.get("lineage")
    if lineage:
        return rebuild_from_lineage(Lineage.from_json(lineage), record["num_classes"], record["channels"],
                                    record["image_size"])
    return create_model(record["spec"], record["num_classes"], record["channels"], record["image_size"])


def check_compatible(teacher: nn.Module, student: nn.Module, info: DatasetInfo, device: torch.device) -> None:
    """Teacher and student must map this dataset's images to the same number of classes."""
    x = torch.zeros(2, info.channels, info.image_size, info.image_size, device=device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        t_out, s_out = teacher(x), student(x)
    student.train(was_training)
    if t_out.shape[1] != s_out.shape[1]:
        raise ConfigError(f"the student outputs {s_out.shape[1]} classes but the teacher {t_out.shape[1]} "
                          f"(dataset {info.name!r} has {info.num_classes})")
