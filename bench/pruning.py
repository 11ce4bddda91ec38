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

A pruned student comes with a :class:`~bench.lineage.Lineage`: ``kept_channels`` (for every
Conv2d/Linear module name of the student, the teacher output channels it kept, in order; all of them
for a layer whose outputs were not pruned), which block-fitting methods (FSKD) read through
``ctx.lineage`` to match student and teacher feature maps, and the pruning ``history`` that rebuilds the
architecture from the teacher's.

Criteria are found by name in :data:`CRITERIA` (``l1``, ``slim`` here; ``evo`` in :mod:`bench.evolution`).

Cache: ``<cache_dir>/students/<teacher_key>/<spec with ':' -> '_'>-<code hash>/`` holds ``model.pt`` (a
plain state dict of tensors) and ``arch.json`` (the lineage). The code hash covers the modules that
build the student, so a changed criterion builds anew. Loading re-prunes a fresh copy of the teacher
architecture with the recorded indices and loads the state dict with ``weights_only=True``: no unsafe
unpickling.
"""
from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from bench.lineage import Lineage, SearchCost, StudentContext, register_student_kind
from bench.models import create_model
from bench.registry import Registry

ARCH_VERSION = 2
SLIM_MAX_LAYER_RATIO = 0.9  # network slimming: never remove more than 90% of one layer's channels


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: ``prune(teacher, ratio, example, spec, ctx, options) -> (model, history, kept, cost)``.

    ``options`` is the text after the ratio (``pruned:evo:0.5:synthetic`` -> ``"synthetic"``), or ""."""

    prune: Callable[..., tuple[nn.Module, list, dict[str, list[int]], SearchCost]]
    options: tuple[str, ...] = ("",)  # the accepted option texts
    # or a check of an open option grammar: raises ValueError naming the bad part and the valid forms
    check_option: Callable[[str], None] | None = None
    module: str = ""  # where it is implemented (its source is part of the cache key)
    seeded: bool = False  # draws randomness from StudentContext.seed (then part of the cache key)


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


class PruningError(ValueError):
    """A pruned student cannot be built for this teacher."""


def parse_args(args: str) -> tuple[str, float, str]:
    """``"l1:0.5"`` -> ``("l1", 0.5, "")``; ``"evo:0.5:synthetic"`` -> ``("evo", 0.5, "synthetic")``.

    Errors name the bad value and the valid forms."""
    criterion, sep, rest = args.partition(":")
    ratio_text, _, option = rest.partition(":")
    valid = CRITERIA.names()
    if criterion not in valid or not sep:
        raise ValueError(f"pruned student {'pruned:' + args!r}: write pruned:<criterion>:<ratio> with criterion one of "
                         f"{', '.join(valid)} (e.g. pruned:l1:0.5)")
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise ValueError(f"pruned student {'pruned:' + args!r}: ratio {ratio_text!r} is not a number; "
                         f"give the fraction of channels to remove, 0 < ratio < 1 (e.g. pruned:{criterion}:0.5)") from None
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruned student {'pruned:' + args!r}: ratio {ratio} must lie strictly between 0 and 1")
    entry = CRITERIA.get(criterion)
    if entry.check_option is not None:
        try:
            entry.check_option(option)
        except ValueError as exc:
            raise ValueError(f"pruned student {'pruned:' + args!r}: {exc}") from None
    elif option not in entry.options:
        shown = [f"pruned:{criterion}:{ratio_text}" + (f":{o}" if o else "") for o in entry.options]
        raise ValueError(f"pruned student {'pruned:' + args!r}: unknown option {option!r}; valid: {', '.join(shown)}")
    return criterion, ratio, option


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


def _record_group(group, names: dict, history: list, kept: dict[str, list[int]]) -> None:
    """Note a pruning group in ``history`` and drop its removed channels from ``kept``, then prune it."""
    root = group[0].dep.target.module
    for dep, idxs in group:
        if dep.pruning_fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            gone = {int(i) for i in idxs}
            name = names[dep.layer]
            kept[name] = [c for c in kept[name] if c not in gone]
    history.append([names[root], True, sorted(int(i) for i in group[0].idxs)])
    group.prune(record_history=False)


def _start(teacher: nn.Module) -> tuple[nn.Module, dict[str, list[int]], dict]:
    model = copy.deepcopy(teacher).eval().requires_grad_(True)  # DepGraph traces autograd
    kept = {name: list(range(_out_channels(m))) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
    return model, kept, {m: n for n, m in model.named_modules()}


def _check(model: nn.Module, teacher: nn.Module, history: list, kept: dict[str, list[int]], spec: str) -> None:
    model.requires_grad_(True)
    if not any(pruned for _, _, pruned in history):
        # e.g. slimming on an untrained BN net: all scales equal, so the global threshold ranks nothing
        raise PruningError(f"{spec}: pruning removed no channel of {type(teacher).__name__} (are all the "
                           f"importance scores equal, e.g. untrained BatchNorm scales?)")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and len(kept[name]) != _out_channels(module):
            raise PruningError(f"{spec}: bookkeeping of kept channels failed for {name!r}")  # a torch-pruning change


def prune_with_importance(teacher: nn.Module, importance, ratio: float, example: torch.Tensor, spec: str,
                          **options) -> tuple[nn.Module, list, dict[str, list[int]]]:
    """A copy of ``teacher`` pruned by torch-pruning's MetaPruner with ``importance`` (the classifier's
    outputs never pruned): ``(model, history, kept_channels)``."""
    model, kept, names = _start(teacher)
    classifier = _classifier(model, example)
    history: list = []
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[classifier], **options)
        for group in pruner.step(interactive=True):
            _record_group(group, names, history, kept)
    _check(model, teacher, history, kept, spec)
    return model, history, kept


def prune_channels(teacher: nn.Module, remove: dict[str, list[int]], example: torch.Tensor, spec: str
                   ) -> tuple[nn.Module, list, dict[str, list[int]]]:
    """A copy of ``teacher`` with exactly the output channels ``remove[layer]`` of each named Conv2d/Linear
    removed (with everything coupled to them, through torch-pruning's dependency graph)."""
    model, kept, names = _start(teacher)
    history: list = []
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        for name, idxs in remove.items():
            if not idxs:
                continue
            layer = model.get_submodule(name)
            fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
            group = graph.get_pruning_group(layer, fn, idxs=sorted(int(i) for i in idxs))
            _record_group(group, names, history, kept)
    _check(model, teacher, history, kept, spec)
    return model, history, kept


def _prune_l1(teacher, ratio, example, spec, ctx, option):
    model, history, kept = prune_with_importance(teacher, FilterL1Importance(), ratio, example, spec,
                                                 global_pruning=False)
    return model, history, kept, SearchCost()


def _prune_slim(teacher, ratio, example, spec, ctx, option):
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
        raise PruningError(f"{spec}: network slimming ranks channels by BatchNorm scale, but the teacher "
                           f"{type(teacher).__name__} has no BatchNorm layer; use pruned:l1:{ratio} (or a BN "
                           f"teacher such as lenet5_bn)")
    model, history, kept = prune_with_importance(teacher, tp.importance.BNScaleImportance(normalizer=None), ratio,
                                                 example, spec, global_pruning=True,
                                                 max_pruning_ratio=SLIM_MAX_LAYER_RATIO)
    return model, history, kept, SearchCost()


CRITERIA.register("l1")(Criterion(_prune_l1, module=__name__))
CRITERIA.register("slim")(Criterion(_prune_slim, module=__name__))


def _rebuild(teacher: nn.Module, history, example: torch.Tensor) -> nn.Module:
    """A fresh copy of the teacher architecture pruned with the recorded indices."""
    model = copy.deepcopy(teacher).eval().requires_grad_(True)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        graph.load_pruning_history([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history])
    return _finish(model, example)


def _finish(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The pruned model's own ``feature_dim`` follows its (maybe pruned) penultimate layer."""
    if hasattr(model, "forward_features") and hasattr(model, "feature_dim"):
        with torch.no_grad():
            model.feature_dim = int(model.eval().forward_features(example).shape[1])
    return model.requires_grad_(True)


def rebuild_from_lineage(lineage: Lineage, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """The architecture of a pruned student from its lineage alone (untrained; no teacher weights needed)."""
    teacher = create_model(lineage.teacher_arch, num_classes, channels, image_size)
    return _rebuild(teacher, lineage.history, torch.zeros(1, channels, image_size, image_size))


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec)


def cache_folder(ctx: StudentContext, spec: str) -> Path:
    """``<cache>/students/<teacher key>/<spec>[-seed<seed>]-<hash of the code that builds it>`` (the seed for
    criteria that draw randomness)."""
    from bench.provenance import modules_hash

    entry = CRITERIA.get(parse_args(spec.partition(":")[2])[0])
    code = modules_hash((__name__, entry.module))
    seed = f"-seed{ctx.seed}" if entry.seeded else ""  # a user's checkpoint teacher has one key for every seed
    return Path(ctx.cache_dir) / "students" / safe_name(ctx.teacher_key) / f"{safe_name(spec)}{seed}-{code}"


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


def save_pruned(model: nn.Module, lineage: Lineage, folder: Path) -> None:
    """``model.pt`` (plain state dict) then ``arch.json`` (written last: its presence marks a complete entry)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_write(folder / "model.pt", lambda p: torch.save(state, p))
    arch = {"version": ARCH_VERSION, "lineage": lineage.to_json(), "params": sum(p.numel() for p in model.parameters())}
    _atomic_write(folder / "arch.json", lambda p: Path(p).write_text(json.dumps(arch, indent=1)))


def load_pruned(teacher: nn.Module, folder: Path, example: torch.Tensor) -> tuple[nn.Module, Lineage]:
    """Rebuild a cached pruned student (re-prune a copy of ``teacher``, load weights_only=True)."""
    from bench.teachers import load_into, load_state_dict  # lazy: bench.teachers imports much of the harness

    arch = json.loads((folder / "arch.json").read_text())
    if arch.get("version") != ARCH_VERSION:
        raise PruningError(f"{folder}/arch.json has version {arch.get('version')!r}, expected {ARCH_VERSION}")
    lineage = Lineage.from_json(arch["lineage"])
    model = _rebuild(teacher, lineage.history, example)
    load_into(model, load_state_dict(folder / "model.pt"), f"cached pruned student {folder}")
    return model, lineage


def build_pruned(teacher: nn.Module, spec: str, example: torch.Tensor, teacher_key: str = "",
                 teacher_arch: str = "", ctx: StudentContext | None = None) -> tuple[nn.Module, Lineage]:
    """Prune ``teacher`` (not modified) per ``spec`` (``pruned:<criterion>:<ratio>[:<option>]``); no cache."""
    kind, _, args = spec.partition(":")
    if kind != "pruned":
        raise ValueError(f"not a pruned-student spec: {spec!r} (expected pruned:<criterion>:<ratio>)")
    criterion, ratio, option = parse_args(args)
    model, history, kept, cost = CRITERIA.get(criterion).prune(teacher, ratio, example, spec, ctx, option)
    lineage = Lineage(spec=spec, teacher_key=teacher_key, teacher_arch=teacher_arch,
                      kept_channels={k: tuple(v) for k, v in kept.items()},
                      history=tuple(tuple(h) for h in history), cost=cost)
    return _finish(model, example), lineage


def code_modules(args: str) -> tuple[str, ...]:
    """The modules whose code builds ``pruned:<args>``: this one and the criterion's."""
    return (__name__, CRITERIA.get(parse_args(args)[0]).module)


@register_student_kind("pruned", validate=validate, code=code_modules)
def pruned_student(args: str, ctx: StudentContext) -> tuple[nn.Module, Lineage]:
    """Builder for ``pruned:<criterion>:<ratio>``: from the cache, else pruned now and cached."""
    spec = f"pruned:{args}"
    parse_args(args)
    example = _example(ctx.info, next(ctx.teacher.parameters()).device)
    folder = cache_folder(ctx, spec)
    if (folder / "arch.json").is_file() and (folder / "model.pt").is_file():
        return load_pruned(ctx.teacher, folder, example)
    model, lineage = build_pruned(ctx.teacher, spec, example, ctx.teacher_key, ctx.teacher_arch, ctx)
    save_pruned(model, lineage, folder)
    return model, lineage
