"""The teacher as a method sees it: one view per declared :class:`TeacherAccess`, and nothing more.

Provision (:mod:`bench.provision`) hands each method the view built for the access it declares:

=============  ==========================================================================================
access         what the view offers (every call counts its images as teacher queries)
=============  ==========================================================================================
``none``       nothing: any use raises :class:`TeacherAccessError` (a student trained on labels)
``weights``    nothing at distillation time (the student was derived from the teacher's weights before)
``labels``     ``teacher(x)`` / ``teacher.labels(x)``: the top-1 class of each image (a hard-label API)
``outputs``    ``teacher(x)``: detached probabilities or logits, as the grid's ``teacher_outputs`` says
               (an API that returns scores); ``teacher.log_probs(x)``: their log-softmax (the same for both)
``features``   the above, plus detached inner activations: ``features_and_logits``, ``forward_features``,
               ``layer_outputs(x, names)`` and the layers' kinds and widths (``layer_shapes``), no weights
``gradients``  :class:`CountingTeacher`, an ``nn.Module`` wrapping the frozen teacher (``.module``): hooks,
               BatchNorm statistics, back-propagation (white box)
=============  ==========================================================================================

The black-box views (``labels``, ``outputs``, ``features``) are not modules and hold no reference to
the teacher: they carry an opaque token into a table private to this module (the same pattern as the
sealed evaluation splits in :mod:`bench.provision`). Asking them for anything else (``.module``,
``.parameters()``, ``.register_forward_hook``...), or passing an input that requires a gradient
(back-propagating through the teacher), raises :class:`TeacherAccessError` naming the declared access
and the access that would allow it. (Python cannot stop code that reads this module's private table:
that is deliberate cheating, not an accident a plugin author can make.)
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bench.monitor import QueryCounter

OUTPUT_KINDS = ("logits", "probs")  # what an ``outputs`` teacher returns (grid key ``teacher_outputs``)


class TeacherAccess(str, enum.Enum):
    """How much of the teacher a method may use; enforced by the view Provision hands it."""

    NONE = "none"  # no teacher (e.g. a student trained on labels)
    WEIGHTS = "weights"  # starts from the teacher's weights (a student derived from it), queries it for nothing
    LABELS = "labels"  # the top-1 class only: a hard-label (decision-based) black box behind an API
    OUTPUTS = "outputs"  # probabilities or logits: a black-box teacher behind an API
    FEATURES = "features"  # inner activations (detached)
    GRADIENTS = "gradients"  # back-propagates through the teacher (white box)

    @property
    def api(self) -> bool:
        """Whether a teacher behind an API (scores or labels, nothing inside) would do."""
        return self in (TeacherAccess.LABELS, TeacherAccess.OUTPUTS)


class TeacherAccessError(PermissionError):
    """A method used more of the teacher than its declared :class:`TeacherAccess` allows."""


@dataclass(frozen=True)
class LayerShape:
    """A teacher layer as a ``features`` method may know it: its kind and output width, no weights."""

    kind: type
    out: int


_ALLOWED = {
    TeacherAccess.NONE: "nothing (the method declared it uses no teacher)",
    TeacherAccess.WEIGHTS: "nothing at distillation time (the student was derived from the teacher's weights)",
    TeacherAccess.LABELS: "teacher(x) / teacher.labels(x): top-1 classes",
    TeacherAccess.OUTPUTS: "teacher(x): detached outputs; teacher.log_probs(x); teacher.labels(x)",
    TeacherAccess.FEATURES: "the outputs calls and detached features: features_and_logits, forward_features, "
                            "layer_outputs, layer_shapes",
}

# the teachers behind the views: token -> (module, outputs kind). Filled by :func:`teacher_view`, emptied by
# :func:`release`; never an attribute of anything a method is handed.
_TEACHERS: dict[int, tuple[nn.Module, str]] = {}
_TOKENS = itertools.count(1)


def _refuse(access: TeacherAccess, what: str, needs: TeacherAccess) -> TeacherAccessError:
    return TeacherAccessError(
        f"{what} needs teacher_access={needs.value!r} or more, but this method declared "
        f"teacher_access={access.value!r}, which allows {_ALLOWED[access]}")


def _teacher_of(view: "LabelTeacher", x: torch.Tensor) -> nn.Module:
    """The teacher behind a black-box view, for an input that asks for no gradient through it (a function
    of this module, not a method of the view: nothing a method is handed returns the module)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise _refuse(view.access, "back-propagating through the teacher (an input that requires grad)",
                      TeacherAccess.GRADIENTS)
    return _TEACHERS[object.__getattribute__(view, "_token")][0]


class NoTeacher:
    """The view for ``none`` and ``weights``: every use of the teacher is refused."""

    __slots__ = ("_access",)

    def __init__(self, access: TeacherAccess):
        object.__setattr__(self, "_access", access)

    @property
    def access(self) -> TeacherAccess:
        return self._access

    def __call__(self, x):
        raise _refuse(self._access, "querying the teacher", TeacherAccess.LABELS)

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):  # Python's own protocol look-ups (copy, pickle...)
            raise AttributeError(name)
        raise _refuse(self._access, f"teacher.{name}", TeacherAccess.GRADIENTS)

    def __setattr__(self, name, value):
        raise TeacherAccessError(f"the teacher view is read-only (teacher.{name} = ...)")

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


class LabelTeacher(NoTeacher):
    """``labels``: the teacher's top-1 class of each image, as a LongTensor; nothing else."""

    __slots__ = ("_token",)

    def __init__(self, token: int, access: TeacherAccess = TeacherAccess.LABELS):
        super().__init__(access)
        object.__setattr__(self, "_token", token)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        module = _teacher_of(self, x)
        with torch.no_grad():
            return module(x).detach()

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's top-1 class of each image of ``x`` (counted as ``len(x)`` queries)."""
        return self._logits(x).argmax(dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.labels(x)


class OutputTeacher(LabelTeacher):
    """``outputs``: detached scores. ``teacher(x)`` returns what the API returns (:attr:`returns`)."""

    __slots__ = ()

    def __init__(self, token: int, access: TeacherAccess = TeacherAccess.OUTPUTS):
        super().__init__(token, access)

    @property
    def returns(self) -> str:
        """``"logits"`` or ``"probs"``: what ``teacher(x)`` returns (the grid's ``teacher_outputs``)."""
        return _TEACHERS[self._token][1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        return logits.float().softmax(dim=1) if self.returns == "probs" else logits

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log softmax of the teacher's scores: the same from logits or from probabilities (KD's soft
        targets and DFME's logit estimate are shift-invariant, so they need nothing more)."""
        out = self(x)
        if self.returns == "probs":
            return out.clamp_min(torch.finfo(out.dtype).tiny).log()
        return F.log_softmax(out.float(), dim=1)


class FeatureTeacher(OutputTeacher):
    """``features``: the outputs calls plus detached inner activations (no weights, no gradients)."""

    __slots__ = ()

    def __init__(self, token: int):
        super().__init__(token, TeacherAccess.FEATURES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)  # a features teacher is inside the model: its outputs are the logits

    @property
    def returns(self) -> str:
        return "logits"

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and logits from one forward, detached."""
        module = _teacher_of(self, x)
        features = module.forward_features(x)
        return features.detach(), module.forward_head(features).detach()

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return _teacher_of(self, x).forward_features(x).detach()

    @torch.no_grad()
    def layer_outputs(self, x: torch.Tensor, names: Iterable[str], *, stop_after: str | None = None
                      ) -> dict[str, torch.Tensor]:
        """The detached outputs of the named layers on ``x`` (``stop_after``: end the forward there)."""
        module = _teacher_of(self, x)
        return {k: v.detach() for k, v in layer_outputs(module, module, names, x, stop_after=stop_after).items()}

    def layer_shapes(self) -> dict[str, LayerShape]:
        """Every Conv2d/Linear layer's kind and output width, by name (what block fitting matches on)."""
        return layer_shapes(_TEACHERS[self._token][0])


def layer_shapes(model: nn.Module) -> dict[str, LayerShape]:
    """``{name: LayerShape}`` of ``model``'s Conv2d and Linear layers."""
    return {name: LayerShape(type(m), m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class _StopForward(Exception):
    pass


def layer_outputs(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], names: Iterable[str],
                  x: torch.Tensor, *, stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Run ``run(x)`` and return the outputs of ``model``'s layers ``names``; with ``stop_after`` the
    forward ends as soon as that layer's output is captured (the rest of the net is not computed)."""
    out: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def capture(module, inputs, output):
            out[name] = output
            if name == stop_after:
                raise _StopForward
        return capture

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        try:
            run(x)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return out


class CountingTeacher(nn.Module):
    """``gradients``: the frozen, eval-mode teacher as a module (white box). Every image through it is a
    teacher query, counted by the harness with a hook on its input layer, so forwards through ``.module``
    (hooks on inner layers) count as well. It offers every call of the narrower views too."""

    access = TeacherAccess.GRADIENTS
    returns = "logits"

    def __init__(self, module: nn.Module, counter: QueryCounter | None = None):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self._counter = counter if counter is not None else QueryCounter(module)

    @property
    def queries(self) -> int:
        return self._counter.count

    def train(self, mode: bool = True) -> "CountingTeacher":
        return self  # the teacher stays in eval mode whatever a method calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_features(x)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate feature and logits from one forward."""
        features = self.module.forward_features(x)
        return features, self.module.forward_head(features)

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x).argmax(dim=1)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.module(x).float(), dim=1)

    def layer_outputs(self, x: torch.Tensor, names: Iterable[str], *, stop_after: str | None = None
                      ) -> dict[str, torch.Tensor]:
        return layer_outputs(self.module, self.module, names, x, stop_after=stop_after)

    def layer_shapes(self) -> dict[str, LayerShape]:
        return layer_shapes(self.module)


def teacher_view(access: TeacherAccess, module: nn.Module, counter: QueryCounter | None, outputs: str = "logits"):
    """The object a method declaring ``access`` receives as its teacher (see the module docstring).

    ``counter`` counts every image through ``module`` (a :class:`bench.monitor.QueryCounter` hooked on
    it); ``outputs``: what an ``outputs`` teacher returns, ``"logits"`` or ``"probs"``."""
    if outputs not in OUTPUT_KINDS:
        raise ValueError(f"teacher_outputs must be one of {', '.join(OUTPUT_KINDS)}, got {outputs!r}")
    access = TeacherAccess(access)
    if access is TeacherAccess.GRADIENTS:
        return CountingTeacher(module, counter)
    if access in (TeacherAccess.NONE, TeacherAccess.WEIGHTS):
        return NoTeacher(access)
    module.eval().requires_grad_(False)
    token = next(_TOKENS)
    _TEACHERS[token] = (module, outputs)
    return {TeacherAccess.LABELS: LabelTeacher, TeacherAccess.OUTPUTS: OutputTeacher,
            TeacherAccess.FEATURES: FeatureTeacher}[access](token)


def release(view) -> None:
    """Forget the teacher behind a black-box view (the cell is over): any later use raises KeyError."""
    token = getattr(view, "_token", None) if isinstance(view, LabelTeacher) else None
    if token is not None:
        _TEACHERS.pop(token, None)
