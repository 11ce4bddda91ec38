"""The pruned student as it comes out of pruning (``no_recovery``): what FSKD and the few-sample
baselines start from.

The "pruned, no fine-tuning" reference of few-sample compression papers (FSKD, Li et al., CVPR 2020,
arXiv 1812.01839, compares recovery methods against it). It reads no training data at all
(data_access NONE, 0 samples used) and does not query the teacher. It is meaningful only for a
student derived from the teacher (``pruned:<criterion>:<ratio>``): any other student would be an
untrained network, so it is refused with an error naming the student.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.method import DataAccess, Method, MethodConfig, TeacherAccess, register
from methods.block_fitting import DERIVED_HINT, NotDerivedError, student_spec


@dataclass
class NoRecoveryConfig(MethodConfig):
    pass


@register("no_recovery")
class NoRecovery(Method):
    data_access = DataAccess.NONE
    teacher_access = TeacherAccess.NONE
    Config = NoRecoveryConfig

    def distill(self, teacher, student, ctx):
        if ctx.lineage is None:
            raise NotDerivedError(f"no_recovery returns a student pruned from the teacher as is, but student "
                                  f"{student_spec(student)!r} was not derived from the teacher (it would be an "
                                  f"untrained network); use {DERIVED_HINT}")
        return student
