"""Teachers: trained by the harness on the training split, cached by config hash, or the user's own.

A teacher is identified by (dataset and its content fingerprint, architecture, recipe, seed, and the
code that trains it). It is trained on the task's training split: the validation split is held out of
the teacher as of every method. Its cache folder ``<cache>/teachers/<key>/`` holds ``model.pt`` (a
plain state dict, loaded with ``weights_only=True``) and ``meta.json`` (test accuracy, recipe, seed,
training time). Cells and runs share cached teachers; a changed recipe, split or training code is a
new key and a new teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import from_mapping, to_dict
from bench.data import ImageData, fingerprint
from bench.metrics import evaluate_accuracy
from bench.models import architecture_code, create_model
from bench.provenance import file_hash, modules_hash, objects_hash
from bench.training import TrainConfig, schedule, train
from bench.transforms import BatchStream, augment, to_float


def teacher_code_hash(arch: str) -> str:
    """The code a harness-trained teacher is the output of (part of its cache key): the training loop, the
    batch transforms and its architecture's code. (Checkpoint loading and caching code is not: it changes no
    weights; nor are the zoo's other models.)"""
    import bench.training as training

    return modules_hash(("bench.transforms",)) + objects_hash(
        (train_teacher, TeacherRecipe, training.TrainConfig, training.schedule, training.train,
         training.make_optimizer)) + architecture_code(arch)


@dataclass
class TeacherRecipe(TrainConfig):
    """How the harness trains a teacher. ``augment``: the dataset's training augmentation."""

    augment: bool = True


# One documented recipe per dataset (the architecture does not change it):
RECIPES: dict[str, dict[str, Any]] = {
    # DAFL official LeNet-5 teacher: Adam 1e-3, batch 256, images resized to 32 (~10 epochs there).
    # 15 epochs here, chosen on the *validation* split (study: examples/studies/teacher_epochs.py, seed 0,
    # one thread): Fashion-MNIST lenet5 val 87.22 / 88.84 / 90.08 / 89.70 % at 5 / 10 / 15 / 20 epochs;
    # lenet5_bn 89.48 / 89.74 / 89.80 % at 5 / 10 / 15.
    "mnist": dict(optimizer="adam", lr=1e-3, batch_size=256, epochs=15),
    "fashion_mnist": dict(optimizer="adam", lr=1e-3, batch_size=256, epochs=15),
    "mnist_5k": dict(optimizer="adam", lr=1e-3, batch_size=128, epochs=30),
    "digits": dict(optimizer="adam", lr=1e-3, batch_size=64, epochs=40),
    # DAFL official CIFAR ResNet-34 teacher: SGD 0.1, momentum 0.9, wd 5e-4, batch 128, 200 epochs,
    # x0.1 at 80/120, random crop + flip. Used for every CIFAR/SVHN architecture.
    "cifar10": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=200,
                    milestones=[80, 120]),
    "cifar100": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=200,
                     milestones=[80, 120]),
    "svhn": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=40,
                 milestones=[20, 30]),
}
DEFAULT_RECIPE: dict[str, Any] = dict(optimizer="adam", lr=1e-3, batch_size=128, epochs=30)  # imagefolder etc.


def recipe_for(dataset: str, overrides: Mapping[str, Any] | None = None, where: str = "teacher_recipe") -> TeacherRecipe:
    return from_mapping(TeacherRecipe, {**RECIPES.get(dataset, DEFAULT_RECIPE), **dict(overrides or {})}, where)


def teacher_key(dataset: str, arch: str, recipe: TeacherRecipe, seed: int, data_fingerprint: str = "",
                pretrained_hash: str = "") -> str:
    identity = {"dataset": dataset, "arch": arch, "recipe": to_dict(recipe), "seed": seed,
                "data": data_fingerprint, "code": teacher_code_hash(arch)}
    if pretrained_hash:  # only then: the keys of teachers trained from scratch stay as they were
        identity["pretrained"] = pretrained_hash
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument > ``DFKD_CACHE_DIR`` > ``~/.cache/dfkd-bench``."""
    return Path(cache_dir or os.environ.get("DFKD_CACHE_DIR") or Path.home() / ".cache" / "dfkd-bench")


class CheckpointError(ValueError):
    """A checkpoint is not a plain state dict, or does not fit the architecture."""


# where training scripts nest the weights inside a checkpoint dict (timm's train.py: "state_dict")
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``path``, loaded with ``weights_only=True`` (never otherwise).

    Accepts a state dict, or a training checkpoint holding one under ``state_dict``, ``model_state_dict``,
    ``model`` or ``net``. A pickled whole module (``torch.save(model)``) is refused with how to save its
    state dict instead."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _PICKLED_GLOBAL.search(str(exc))
        what = f" (it needs the class {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds a pickled Python object{what}, e.g. a whole model saved with torch.save(model), not a "
            "state dict. dfkd-bench loads checkpoints with torch.load(weights_only=True) only, so that a file "
            "cannot run code. Save the weights instead, in your own trusted session: "
            f"model = torch.load('{path}', weights_only=False); torch.save(model.state_dict(), 'teacher_state_dict.pt') "
            "(for a model wrapped in DataParallel: model.module.state_dict()), and pass that file") from None
    except Exception as exc:  # torch raises RuntimeError/KeyError/EOFError with its own message for a damaged file
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: {exc}); "
                              "save a plain state dict: torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(state.get(key), dict) and state[key]:
                state = state[key]
                break
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise CheckpointError(f"{path}: not a plain state dict of tensors (got {type(state).__name__}); "
                              "save one with torch.save(model.state_dict(), path)")
    return state


def _mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, wrong


def _describe(missing: list, unexpected: list, wrong: list, show: int = 8) -> str:
    parts = []
    for what, items in (("shape mismatch", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > show else ""
            parts.append(f"{what} {items[:show]}{more}")
    return "; ".join(parts)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly, with an error that names the mismatching keys and shapes."""
    missing, unexpected, wrong = _mismatch(model.state_dict(), state)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {_describe(missing, unexpected, wrong)}")
    model.load_state_dict(state)
    return model


def key_layouts(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The ways a user's state dict may be laid out, each mapped to ``model``'s key names: as saved by this
    harness; from the unwrapped library model (timm's or torchvision's own ``state_dict()``, through
    :meth:`~bench.models.Classifier.map_foreign_key`); each with DataParallel's ``module.`` prefix removed."""
    layouts = [("as saved", state)]
    if state and all(k.startswith("module.") for k in state):
        layouts.append(("without DataParallel's 'module.' prefix", {k[len("module."):]: v for k, v in state.items()}))
    mapper = getattr(model, "map_foreign_key", None)
    if mapper is not None:
        for name, layout in list(layouts):
            mapped = {mapper(k): v for k, v in layout.items()}
            if list(mapped) != list(layout):
                label = f"{type(model).__name__}'s library key names" + ("" if name == "as saved" else f", {name}")
                layouts.append((label, mapped))
    return layouts


def load_checkpoint_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    """Load a user's ``state`` into ``model`` in whichever layout of :func:`key_layouts` fits exactly; returns
    that layout's name. When none fits, the error lists the missing and unexpected keys of the closest one."""
    own = model.state_dict()
    best = None
    for name, layout in key_layouts(model, state):
        missing, unexpected, wrong = _mismatch(own, layout)
        if not (missing or unexpected or wrong):
            model.load_state_dict(layout)
            return name
        score = len(missing) + len(unexpected) + len(wrong)
        if best is None or score < best[0]:
            best = (score, name, missing, unexpected, wrong)
    _, name, missing, unexpected, wrong = best
    tried = ", ".join(n for n, _ in key_layouts(model, state))
    raise CheckpointError(f"{source} does not fit {type(model).__name__} (closest key layout: {name}; tried: {tried}): "
                          f"{_describe(missing, unexpected, wrong)}. Save the state dict of the same architecture "
                          "built with the dataset's number of classes and channels")


def load_pretrained(model: nn.Module, path: str | os.PathLike, source: str = "teacher_pretrained") -> dict[str, Any]:
    """Initialise ``model`` from a local pretrained weights file (e.g. ImageNet weights of a timm model) before
    the harness trains it: the classifier is kept freshly initialised when its shape differs (another number
    of classes), a 3-channel stem conv is summed to 1 channel for grey images (as timm's adapt_input_conv).
    Every other key must fit. Returns what was adapted."""
    state = load_state_dict(Path(path))
    own = model.state_dict()
    head = model.classifier_prefix() if hasattr(model, "classifier_prefix") else None
    best = None
    for name, layout in key_layouts(model, state):
        layout = dict(layout)
        adapted = {"layout": name, "reinitialised": [], "summed_channels": []}
        for key in list(layout):
            if key not in own or layout[key].shape == own[key].shape:
                continue
            if head and key.startswith(head):
                adapted["reinitialised"].append(key)
                del layout[key]
            elif layout[key].dim() == 4 and own[key].dim() == 4 and own[key].shape[1] == 1 \
                    and layout[key].shape[0] == own[key].shape[0] and layout[key].shape[2:] == own[key].shape[2:]:
                layout[key] = layout[key].sum(dim=1, keepdim=True)
                adapted["summed_channels"].append(key)
        missing, unexpected, wrong = _mismatch(own, layout)
        missing = [k for k in missing if not (head and k.startswith(head) and any(r.startswith(head) for r in adapted["reinitialised"]))]
        if not (missing or unexpected or wrong):
            model.load_state_dict(layout, strict=False)
            return adapted
        score = len(missing) + len(unexpected) + len(wrong)
        if best is None or score < best[0]:
            best = (score, name, missing, unexpected, wrong)
    _, name, missing, unexpected, wrong = best
    raise CheckpointError(f"{source} {str(path)!r} does not fit {type(model).__name__} (closest key layout: {name}): "
                          f"{_describe(missing, unexpected, wrong)}")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    if path.suffix == ".json":
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def train_teacher(model: nn.Module, data: ImageData, recipe: TeacherRecipe,
                  log: Callable[[int, dict[str, torch.Tensor]], None]) -> None:
    """Supervised training on the full training split with the recipe's optimiser and schedule."""
    plan = schedule(recipe, 1.0, data.info.train_size)
    generator = torch.Generator().manual_seed(0)
    kind = data.info.augment if recipe.augment else "none"
    stream = BatchStream(data.train_x, data.train_y, recipe.batch_size, generator=generator,
                         transform=lambda xb: augment(to_float(xb, data.info), kind, generator))

    def step(it: int) -> dict[str, torch.Tensor]:
        x, yb = next(stream)
        return {"loss": F.cross_entropy(model(x), yb)}

    model.train()
    train(model.parameters(), step, recipe, plan, log=log, log_every=100)
    model.eval()


@dataclass
class Teacher:
    model: nn.Module
    arch: str
    accuracy: float  # test top-1, percent
    key: str  # cache key, or "checkpoint:<sha>" for a user's checkpoint
    meta: dict[str, Any]


def get_teacher(dataset: str, arch: str, data: ImageData, device: torch.device, *, seed: int = 0,
                recipe: TeacherRecipe | None = None, cache_dir: Path | None = None, checkpoint: str | None = None,
                pretrained: str | None = None,
                log: Callable[[int, dict[str, torch.Tensor]], None] = lambda it, losses: None,
                on_train: Callable[[int], None] | None = None) -> Teacher:
    """The teacher for (dataset, arch): the user's ``checkpoint`` (trained weights, used as they are), else
    cached, else trained now with the recipe (from ``pretrained`` weights when given, else from scratch)."""
    info = data.info
    model = create_model(arch, info.num_classes, info.channels, info.image_size)
    evaluate = lambda m: evaluate_accuracy(m, data.test_x, data.test_y, lambda xb: to_float(xb, info))
    if checkpoint is not None and pretrained is not None:
        raise CheckpointError("give a teacher_checkpoint (a trained teacher, used as it is) or teacher_pretrained "
                              "(weights the harness starts training from), not both")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"teacher_checkpoint {checkpoint!r} does not exist")
        layout = load_checkpoint_into(model, load_state_dict(path), f"teacher_checkpoint {checkpoint!r}")
        model.to(device).eval()
        return Teacher(model, arch, evaluate(model), f"checkpoint:{file_hash(str(path))}",
                       {"checkpoint": str(path), "key_layout": layout})
    if pretrained is not None and not Path(pretrained).is_file():
        raise CheckpointError(f"teacher_pretrained {pretrained!r} does not exist")

    recipe = recipe or recipe_for(dataset)
    key = teacher_key(dataset, arch, recipe, seed, fingerprint(data), file_hash(pretrained) if pretrained else "")
    folder = resolve_cache_dir(cache_dir) / "teachers" / key
    if (folder / "meta.json").is_file() and (folder / "model.pt").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        load_into(model, load_state_dict(folder / "model.pt"), f"cached teacher {folder}")
        model.to(device).eval()
        return Teacher(model, arch, float(meta["accuracy"]), key, meta)

    torch.manual_seed(seed)
    model = create_model(arch, info.num_classes, info.channels, info.image_size)
    adapted = load_pretrained(model, pretrained) if pretrained is not None else None
    model = model.to(device)
    if on_train is not None:
        on_train(schedule(recipe, 1.0, info.train_size).total)
    started = time.perf_counter()
    train_teacher(model, data, recipe, log)
    val = evaluate_accuracy(model, data.val_x, data.val_y, lambda xb: to_float(xb, info)) \
        if data.val_x is not None and data.val_x.shape[0] else None
    meta = {"dataset": dataset, "arch": arch, "seed": seed, "recipe": to_dict(recipe), "accuracy": evaluate(model),
            "val_accuracy": val,
            "train_seconds": round(time.perf_counter() - started, 2), "device": str(device),
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if pretrained is not None:
        meta.update(pretrained=str(pretrained), pretrained_adapted=adapted)
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")
    _atomic_save(meta, folder / "meta.json")
    return Teacher(model, arch, meta["accuracy"], key, meta)


def list_cached(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Metadata of every cached teacher."""
    root = resolve_cache_dir(cache_dir) / "teachers"
    rows = []
    for meta_path in sorted(root.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        rows.append({"key": meta_path.parent.name, **{k: meta.get(k) for k in
                     ("dataset", "arch", "seed", "accuracy", "val_accuracy", "train_seconds", "device", "created")}})
    return rows
