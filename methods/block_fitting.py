"""Block fitting for students derived from the teacher (FSKD and its few-sample baselines).

Shared by ``fskd``, ``fitnet_few``: where student and teacher feature maps correspond, how to read
them, how to fit a 1x1 map Q in closed form, and how to merge Q exactly into the preceding conv.

Fit points. A *fit point* is a Conv2d (groups=1) or Linear layer of the student other than the
classifier (the layer whose output is the model's output; included on request, see
:func:`fit_points`), together with the BatchNorm that
directly consumes its output if that BN is its only consumer (folding a BN changes the conv's own
output: where that output also feeds something else, e.g. the identity shortcut of a
pre-activation WRN's stem, the block is the conv alone and Q sits before the BN; counted on the
autograd graph of one traced forward). Its *output* is the BN output (the conv with BN folded in,
eval mode), else the layer output: the pre-activation of the block, taken before any nonlinearity
and, in residual blocks, before the addition (a Q after the addition could not be merged into an
identity shortcut). A derived student (``bench.pruning``) keeps the teacher's module names and
its lineage (``ctx.lineage``) carries ``kept_channels: dict[str, tuple[int, ...]]`` (module name -> the teacher output channels it
kept, in order), so the teacher's matching target is the output of the same-named teacher module
restricted to those channels. LeNet-5: conv1, conv2, conv3 and fc1 (a Linear is fitted as a 1x1
block on N rows; fc2, the classifier, only with ``fit_classifier``). VGG: every conv (+BN) and every hidden
Linear. ResNets: every conv (+BN) of the residual branches, the stem and the projection shortcuts.

Least squares. ``Q^T = argmin ||X Q^T - Y||^2 + lam ||Q||^2`` over the N*H*W rows (N for a Linear)
of student output X and teacher target Y, from streamed sums ``X^T X`` and ``X^T Y`` (float64):
``Q^T = (X^T X + lam I)^{-1} X^T Y`` by Cholesky. ``lam = ridge * trace(X^T X) / C`` with a tiny
relative ``ridge`` (default 1e-8): it only matters when a channel is constant zero (a dead filter),
where it keeps the system solvable and that input channel's column of Q at zero.

Merge (exact). conv W (C_o x C_i x k x k), bias b, then Q: ``W'[:, :, u, v] = Q @ W[:, :, u, v]``,
``b' = Q @ b``. With BN between, BN is folded into the conv first (``s = gamma / sqrt(var + eps)``,
``W~ = diag(s) W``, ``b~ = s * (b - mu) + beta``) and then merged; the BN module is kept but set to
the identity with the merged bias as its shift (mean 0, var 1, weight sqrt(1 + eps), bias Q b~), so
the student keeps exactly the pruned architecture: same parameters, same FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from bench.teacher_access import layer_outputs, layer_shapes

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
DERIVED_HINT = "a student derived from the teacher, e.g. pruned:l1:0.5"


class NotDerivedError(ValueError):
    """Block fitting needs to know which teacher channels each student layer kept."""


@dataclass(frozen=True)
class FitPoint:
    """One block: ``layer`` (Conv2d/Linear) and the BatchNorm right after it (or None)."""

    layer: str
    bn: str | None
    kept: tuple[int, ...]  # teacher output channels kept by the student, in the student's order

    @property
    def output(self) -> str:
        """The module whose output is the block's pre-activation output."""
        return self.bn or self.layer


# ---------------------------------------------------------------------------------------------
# fit points


def student_spec(student: nn.Module, lineage=None) -> str:
    """How errors name the student: its derived spec (e.g. ``pruned:l1:0.5``) or its class."""
    return lineage.spec if lineage is not None else type(student).__name__


def kept_channels(ctx) -> dict[str, tuple[int, ...]] | None:
    """The kept teacher channels of the cell's derived student (its lineage), or None for a zoo student."""
    return ctx.lineage.kept_channels if ctx.lineage is not None else None


def _trace_order(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, str], str | None]:
    """Conv/Linear layers in execution order, {layer: the BN that directly consumes its output},
    and the name of the layer whose output is the model output (the classifier)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    last_out: dict[int, str] = {}
    bn_after: dict[str, str] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def layer_hook(module, inputs, output):
        name = names[module]
        if name not in order:
            order.append(name)
        last_out[id(output)] = name
        outputs[name] = output

    def bn_pre_hook(module, inputs):
        src = last_out.get(id(inputs[0]))
        if src is not None and outputs.get(src) is inputs[0]:
            bn_after.setdefault(src, names[module])

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, BN_TYPES):
            handles.append(module.register_forward_pre_hook(bn_pre_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():  # the autograd graph tells how many consumers each layer output has
            logits = model(example.detach().clone().requires_grad_(True))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    uses = _consumer_counts(logits)
    bn_after = {name: bn for name, bn in bn_after.items() if uses.get(outputs[name].grad_fn, 0) == 1}
    classifier = next((n for n, t in outputs.items() if t is logits), None)
    return order, bn_after, classifier


def _consumer_counts(output: torch.Tensor) -> dict:
    """{autograd node: how many operations consume its output} over the graph that produced ``output``."""
    counts: dict = {}
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                counts[parent] = counts.get(parent, 0) + 1
                stack.append(parent)
    return counts


def classifier_name(model: nn.Module, example: torch.Tensor) -> str | None:
    """The Conv/Linear layer whose output is the model's output (None if the output is computed after it)."""
    return _trace_order(model, example)[2]


def fit_points(student: nn.Module, teacher: nn.Module | dict, example: torch.Tensor, kept: dict | None, *,
               spec: str = "student", fit_linear: bool = True, fit_classifier: bool = False) -> list[FitPoint]:
    """The student's blocks with a teacher counterpart, input first (see the module docstring).

    ``fit_classifier``: also the classifier, whose outputs (the logits) are never pruned: its Q is a
    K x K map on the logits, fitted against the teacher's logits and merged into the classifier.

    ``teacher``: the teacher module, or its layers' kinds and widths (``teacher.layer_shapes()`` of the
    view a ``features`` method receives: no weights needed).

    ``kept``: the lineage's kept channels (``ctx.lineage.kept_channels``). Raises :class:`NotDerivedError`
    when there are none (the student was not derived from the teacher) or its layers do not match the
    teacher's by name and shape."""
    if not isinstance(kept, dict):
        raise NotDerivedError(
            f"student {spec!r} was not derived from the teacher: block fitting needs to know which teacher "
            f"channels each student layer kept (its lineage's kept_channels); use {DERIVED_HINT}")
    order, bn_after, classifier = _trace_order(student, example)
    s_modules = dict(student.named_modules())
    t_layers = teacher if isinstance(teacher, dict) else layer_shapes(teacher)
    points = []
    for name in order:
        layer = s_modules[name]
        if (name == classifier and not fit_classifier) or (isinstance(layer, nn.Linear) and not fit_linear
                                                            and name != classifier):
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue  # a depthwise/grouped conv mixes no channels: a full C'xC' Q cannot be merged into it
        t_layer = t_layers.get(name)
        if t_layer is None or t_layer.kind is not type(layer):
            raise NotDerivedError(f"student {spec!r}: layer {name!r} has no {type(layer).__name__} counterpart in the "
                                  f"teacher; block fitting needs {DERIVED_HINT}")
        out_s = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        out_t = t_layer.out
        channels = tuple(kept.get(name, range(out_t)))
        if len(channels) != out_s or (channels and max(channels) >= out_t):
            raise NotDerivedError(f"student {spec!r}: layer {name!r} has {out_s} output channels but kept_channels "
                                  f"names {len(channels)} of the teacher's {out_t}; block fitting needs {DERIVED_HINT} "
                                  f"pruned from this teacher")
        points.append(FitPoint(layer=name, bn=bn_after.get(name), kept=channels))
    if not points:
        raise NotDerivedError(f"student {spec!r}: no Conv2d/Linear layer to fit besides the classifier")
    return points


# ---------------------------------------------------------------------------------------------
# reading block outputs


def capture(model: nn.Module, modules: Iterable[str], x: torch.Tensor, *, stop_after: str | None = None
            ) -> dict[str, torch.Tensor]:
    """The outputs of ``model``'s layers ``modules`` (names) on ``x``; with ``stop_after``, the forward pass
    ends as soon as that layer's output is captured (saves the rest of the net)."""
    return layer_outputs(model, model, modules, x, stop_after=stop_after)


def rows(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, C) -> (N*H*W, C): one row per position, channels as columns."""
    if feature.dim() == 2:
        return feature
    return feature.transpose(0, 1).reshape(feature.shape[1], -1).t()


# ---------------------------------------------------------------------------------------------
# least squares


class NormalEquations:
    """Streaming sums ``X^T X`` and ``X^T Y`` (float64) for ``Q^T = argmin ||X Q^T - Y||``."""

    def __init__(self, channels_in: int, channels_out: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(channels_in, channels_in, dtype=torch.float64, device=device)
        self.xty = torch.zeros(channels_in, channels_out, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows: ``x`` (R, C_in) student features, ``y`` (R, C_out) targets (or feature maps)."""
        x = rows(x).to(torch.float64)
        y = rows(y).to(torch.float64)
        self.xtx += x.t() @ x
        self.xty += x.t() @ y
        self.count += x.shape[0]

    def solve(self, ridge: float = 1e-8) -> torch.Tensor:
        """Q (C_out x C_in), float32."""
        return solve_q(self.xtx, self.xty, ridge)


def solve_q(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """``Q = ((X^T X + lam I)^{-1} X^T Y)^T`` with ``lam = ridge * trace(X^T X) / C`` (Cholesky;
    least squares by ``torch.linalg.lstsq`` if the system is still not positive definite)."""
    c = xtx.shape[0]
    lam = ridge * float(torch.diagonal(xtx).sum()) / max(c, 1)
    a = xtx + (lam if lam > 0 else 1e-12) * torch.eye(c, dtype=xtx.dtype, device=xtx.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        qt = torch.cholesky_solve(xty, chol)
    else:
        qt = torch.linalg.lstsq(a.cpu(), xty.cpu()).solution.to(xtx.device)
    return qt.t().to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# Q in place (hook) and merged


def apply_q(feature: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv without bias (or a Linear without bias on (N, C)): mixes channels by ``q``."""
    if feature.dim() == 2:
        return feature @ q.t()
    return torch.einsum("oc,nchw->nohw", q, feature)


def insert_q(model: nn.Module, point: FitPoint, q: torch.Tensor):
    """Put Q after the block as a forward hook (the unmerged student); returns the hook handle."""
    module = model.get_submodule(point.output)
    return module.register_forward_hook(lambda m, inputs, output: apply_q(output, q.to(output.dtype)))


@torch.no_grad()
def merge_q(model: nn.Module, point: FitPoint, q: torch.Tensor) -> None:
    """Merge Q exactly into the block's layer (after folding its BN; see the module docstring)."""
    layer = model.get_submodule(point.layer)
    w = layer.weight.detach().to(torch.float64)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                            device=w.device)
    q64 = q.to(device=w.device, dtype=torch.float64)
    if point.bn is None:
        w_new = torch.einsum("oc,c...->o...", q64, w)
        b_new = q64 @ b
        layer.weight.copy_(w_new.to(layer.weight.dtype))
        if layer.bias is not None:  # without a bias b = 0 and Q @ b = 0: nothing to store
            layer.bias.copy_(b_new.to(layer.bias.dtype))
        return
    # BN between conv and Q: fold BN into the conv FIRST, then merge. (The official FSKD code's BN
    # branch merges Q into the conv *before* the BN, i.e. computes BN(Q W x) instead of Q BN(W x):
    # that is wrong whenever BN's per-channel scales differ, since diag(s) and Q do not commute.)
    bn = model.get_submodule(point.bn)
    if not (bn.affine and bn.track_running_stats and bn.running_mean is not None):
        raise ValueError(f"cannot fold BatchNorm {point.bn!r}: it needs affine=True and running statistics")
    mean = bn.running_mean.to(torch.float64)
    var = bn.running_var.to(torch.float64)
    scale = bn.weight.to(torch.float64) / torch.sqrt(var + bn.eps)
    shift = bn.bias.to(torch.float64) + scale * (b - mean)
    w_new = torch.einsum("oc,c...->o...", q64 * scale, w)  # Q @ diag(s) @ W
    b_new = q64 @ shift
    layer.weight.copy_(w_new.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.zero_()
    # The BN stays (same architecture) as the identity plus the merged bias, in eval mode.
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.fill_(float(torch.sqrt(torch.tensor(1.0 + bn.eps, dtype=torch.float64))))
    bn.bias.copy_(b_new.to(bn.bias.dtype))


# ---------------------------------------------------------------------------------------------
# teacher targets


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@torch.no_grad()
def teacher_targets(teacher, points: Iterable[FitPoint], images: torch.Tensor, prepare, batch_size: int
                    ) -> dict[str, list[torch.Tensor]]:
    """Every fit point's teacher output restricted to the kept channels, per batch: one counted teacher
    pass over ``images`` (``teacher``: the view a ``features`` method receives, ``layer_outputs``)."""
    points = list(points)
    names = [p.output for p in points]
    kept = {p.output: torch.tensor(p.kept, device=images.device) for p in points}
    out: dict[str, list[torch.Tensor]] = {p.output: [] for p in points}
    for xb in batches(images, batch_size):
        feats = teacher.layer_outputs(prepare(xb), names)
        for name, f in feats.items():
            out[name].append(f.index_select(1, kept[name]).float())
    return out
