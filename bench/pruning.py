"""Students pruned from the teacher: ``pruned:l1:<ratio>`` and ``pruned:slim:<ratio>``.

Structured filter pruning with torch-pruning's DepGraph (Fang et al., CVPR 2023) through its
``MetaPruner``: coupled layers (a conv, its BN, the next layer's inputs, residual additions) are
pruned together, the surviving weights are the teacher's, and the classifier's outputs are never
pruned (the teacher's classes stay).

- ``pruned:l1:<ratio>``: L1-norm filter pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient
  ConvNets"): in every prunable group (every conv and hidden Linear, with what is coupled to it),
  ``int(C * ratio)`` output channels with the smallest filter L1 norm ``sum |W[c]|`` are removed. In
  a group of coupled layers (a ResNet's residual stream) the L1 norms of all coupled filters are
  summed. Uniform per-layer ratio (the paper's VGG-16 "pruned-A" prunes only some layers).
- ``pruned:slim:<ratio>``: network slimming (Liu et al., ICCV 2017): channels ranked by |BN scale|
  with one global threshold over all layers (``ratio`` of all prunable channels removed, at most 90%
  of any one layer). The teacher must have BatchNorm. Here the teacher was not trained with the
  paper's L1 penalty on the scales, so this is slimming's criterion on an ordinary teacher.

A pruned student carries ``kept_channels: dict[str, list[int]]``: for every Conv2d/Linear module
name of the student, the teacher output channels it kept, in order (all of them for a layer whose
outputs were not pruned). Block-fitting methods (FSKD) read it to match student and teacher feature
maps. It also carries ``pruning_spec`` (the spec) and ``pruned_from`` (the teacher's cache key).

Cache: ``<cache_dir>/students/<teacher_key>/<spec with ':' -> '_'>/`` holds ``model.pt`` (a plain
state dict of tensors) and ``arch.json`` (the pruning history: for each pruned group its root module,
and the pruned output-channel indices, plus ``kept_channels``). Loading re-prunes a fresh copy of the
teacher architecture with the same indices and loads the state dict with ``weights_only=True``: no
unsafe unpickling.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from bench.students import StudentContext, register_student_kind

CRITERIA = ("l1", "slim")
ARCH_VERSION = 1
SLIM_MAX_LAYER_RATIO = 0.9  # network slimming: never remove more than 90% of one layer's channels


class PruningError(ValueError):
    """A pruned student cannot be built for this teacher."""


def parse_args(args: str) -> tuple[str, float]:
    """``"l1:0.5"`` -> ``("l1", 0.5)``; errors name the bad value and the valid forms."""
    criterion, sep, ratio_text = args.partition(":")
    if criterion not in CRITERIA or not sep:
        raise ValueError(f"pruned student {'pruned:' + args!r}: write pruned:<criterion>:<ratio> with criterion one of "
                         f"{', '.join(CRITERIA)} (e.g. pruned:l1:0.5)")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise ValueError(f"pruned student {'pruned:' + args!r}: ratio {ratio_text!r} is not a number; "
                         f"give the fraction of channels to remove, 0 < ratio < 1 (e.g. pruned:{criterion}:0.5)") from None
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruned student {'pruned:' + args!r}: ratio {ratio} must lie strictly between 0 and 1")
    return criterion, ratio


def validate(args: str) -> None:
    parse_args(args)


class FilterL1Importance(tp.importance.Importance):
    """Li et al. 2017: a channel's score is the L1 norm of its filter (summed over coupled filters)."""

    @torch.no_grad()
    def __call__(self, group):
        scores = None
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            layer = dep.layer
            w = layer.weight.data.transpose(0, 1) if getattr(layer, "transposed", False) else layer.weight.data
            local = w[idxs].flatten(1).abs().sum(1).float()
            root = torch.tensor(group[i].root_idxs, device=local.device)
            scores = torch.zeros(len(group[0].idxs), device=local.device) if scores is None else scores
            scores.scatter_add_(0, root, local)
        return scores


def _classifier(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The leaf module whose output is the model's output (its outputs must not be pruned)."""
    found: dict[int, nn.Module] = {}
    handles = [m.register_forward_hook(lambda m, i, o: found.__setitem__(id(o), m))
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    module = found.get(id(out))
    if module is None:
        raise PruningError(f"cannot find the classifier of {type(model).__name__}: its output is not the output "
                           "of a Linear/Conv2d layer")
    return module


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _example(ctx_info, device) -> torch.Tensor:
    return torch.zeros(1, ctx_info.channels, ctx_info.image_size, ctx_info.image_size, device=device)


def _prune(teacher: nn.Module, criterion: str, ratio: float, example: torch.Tensor, spec: str
           ) -> tuple[nn.Module, list, dict[str, list[int]]]:
    """A pruned copy of ``teacher``, its pruning history and its kept channels."""
    model = copy.deepcopy(teacher).eval().requires_grad_(True)  # DepGraph traces autograd
    if criterion == "slim":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise PruningError(f"{spec}: network slimming ranks channels by BatchNorm scale, but the teacher "
                               f"{type(teacher).__name__} has no BatchNorm layer; use pruned:l1:{ratio}")
        importance = tp.importance.BNScaleImportance(normalizer=None)
        options = dict(global_pruning=True, max_pruning_ratio=SLIM_MAX_LAYER_RATIO)
    else:
        importance = FilterL1Importance()
        options = dict(global_pruning=False)
    classifier = _classifier(model, example)
    original = {name: list(range(_out_channels(m))) for name, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))}
    names = {m: n for n, m in model.named_modules()}
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[classifier], **options)
        history = []
        for group in pruner.step(interactive=True):
            root = group[0].dep.target.module
            pruned_by_layer: dict[str, list[int]] = {}
            for dep, idxs in group:
                if dep.pruning_fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                    pruned_by_layer[names[dep.layer]] = sorted(int(i) for i in idxs)
            history.append([names[root], True, sorted(int(i) for i in group[0].idxs)])
            for name, pruned in pruned_by_layer.items():
                gone = set(pruned)
                original[name] = [c for c in original[name] if c not in gone]
            group.prune(record_history=False)
    model.requires_grad_(True)
    if not any(pruned for _, _, pruned in history):
        # e.g. slimming on an untrained BN net: all scales equal, so the global threshold ranks nothing
        raise PruningError(f"{spec}: pruning removed no channel of {type(teacher).__name__} (are all the "
                           f"importance scores equal, e.g. untrained BatchNorm scales?)")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and len(original[name]) != _out_channels(module):
            raise PruningError(f"{spec}: bookkeeping of kept channels failed for {name!r}")  # a torch-pruning change
    return model, history, original


def _rebuild(teacher: nn.Module, history: list, example: torch.Tensor) -> nn.Module:
    """A fresh copy of the teacher architecture pruned with the recorded indices."""
    model = copy.deepcopy(teacher).eval().requires_grad_(True)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        graph.load_pruning_history([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history])
    return model


def _finish(model: nn.Module, kept: dict[str, list[int]], spec: str, teacher_key: str, example: torch.Tensor) -> nn.Module:
    model.kept_channels = {k: list(v) for k, v in kept.items()}
    model.pruning_spec = spec
    model.pruned_from = teacher_key
    if hasattr(model, "forward_features") and hasattr(model, "feature_dim"):
        with torch.no_grad():
            model.feature_dim = int(model.eval().forward_features(example).shape[1])
    return model.requires_grad_(True)


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def cache_folder(ctx: StudentContext, spec: str) -> Path:
    return Path(ctx.cache_dir) / "students" / safe_name(ctx.teacher_key) / safe_name(spec)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pruned(model: nn.Module, history: list, folder: Path) -> None:
    """``model.pt`` (plain state dict) then ``arch.json`` (written last: its presence marks a complete entry)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_write(folder / "model.pt", lambda p: torch.save(state, p))
    arch = {"version": ARCH_VERSION, "spec": model.pruning_spec, "teacher_key": model.pruned_from,
            "history": history, "kept_channels": model.kept_channels,
            "params": sum(p.numel() for p in model.parameters())}
    _atomic_write(folder / "arch.json", lambda p: Path(p).write_text(json.dumps(arch, indent=1)))


def load_pruned(teacher: nn.Module, folder: Path, example: torch.Tensor) -> nn.Module:
    """Rebuild a cached pruned student (re-prune a copy of ``teacher``, load weights_only=True)."""
    from bench.teachers import load_into, load_state_dict  # lazy: bench.teachers imports much of the harness

    arch = json.loads((folder / "arch.json").read_text())
    if arch.get("version") != ARCH_VERSION:
        raise PruningError(f"{folder}/arch.json has version {arch.get('version')!r}, expected {ARCH_VERSION}")
    model = _rebuild(teacher, arch["history"], example)
    load_into(model, load_state_dict(folder / "model.pt"), f"cached pruned student {folder}")
    return _finish(model, arch["kept_channels"], arch["spec"], arch["teacher_key"], example)


def build_pruned(teacher: nn.Module, spec: str, example: torch.Tensor, teacher_key: str = "") -> tuple[nn.Module, list]:
    """Prune ``teacher`` (not modified) per ``spec`` (``pruned:<criterion>:<ratio>``); no cache."""
    kind, _, args = spec.partition(":")
    if kind != "pruned":
        raise ValueError(f"not a pruned-student spec: {spec!r} (expected pruned:<criterion>:<ratio>)")
    criterion, ratio = parse_args(args)
    model, history, kept = _prune(teacher, criterion, ratio, example, spec)
    return _finish(model, kept, spec, teacher_key, example), history


@register_student_kind("pruned", validate=validate)
def pruned_student(args: str, ctx: StudentContext) -> nn.Module:
    """Builder for ``pruned:<criterion>:<ratio>``: from the cache, else pruned now and cached."""
    spec = f"pruned:{args}"
    parse_args(args)
    example = _example(ctx.info, next(ctx.teacher.parameters()).device)
    folder = cache_folder(ctx, spec)
    if (folder / "arch.json").is_file() and (folder / "model.pt").is_file():
        return load_pruned(ctx.teacher, folder, example)
    model, history = build_pruned(ctx.teacher, spec, example, ctx.teacher_key)
    save_pruned(model, history, folder)
    return model
