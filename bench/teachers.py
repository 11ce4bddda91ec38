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
from bench.models import create_model
from bench.provenance import file_hash, modules_hash, objects_hash
from bench.training import TrainConfig, schedule, train
from bench.transforms import BatchStream, augment, to_float


def teacher_code_hash() -> str:
    """The code a harness-trained teacher is the output of (part of its cache key): the training loop, the
    batch transforms and the model zoo. (Checkpoint loading and caching code is not: it changes no weights.)"""
    import bench.training as training

    return modules_hash(("bench.transforms", "bench.models")) + objects_hash(
        (train_teacher, TeacherRecipe, training.TrainConfig, training.schedule, training.train, training.make_optimizer))


@dataclass
class TeacherRecipe(TrainConfig):
    """How the harness trains a teacher. ``augment``: the dataset's training augmentation."""

    augment: bool = True


# One documented recipe per dataset (the architecture does not change it):
RECIPES: dict[str, dict[str, Any]] = {
    # DAFL official LeNet-5 teacher: Adam 1e-3, batch 256, images resized to 32 (~10 epochs there;
    # 15 here so that the Fashion-MNIST teacher clears 89%).
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


def teacher_key(dataset: str, arch: str, recipe: TeacherRecipe, seed: int, data_fingerprint: str = "") -> str:
    blob = json.dumps({"dataset": dataset, "arch": arch, "recipe": to_dict(recipe), "seed": seed,
                       "data": data_fingerprint, "code": teacher_code_hash()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument > ``DFKD_CACHE_DIR`` > ``~/.cache/dfkd-bench``."""
    return Path(cache_dir or os.environ.get("DFKD_CACHE_DIR") or Path.home() / ".cache" / "dfkd-bench")


class CheckpointError(ValueError):
    """A checkpoint is not a plain state dict, or does not fit the architecture."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``path``, loaded with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError with its own message
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({type(exc).__name__}: {exc}); "
                              "save a plain state dict: torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise CheckpointError(f"{path}: not a plain state dict of tensors (got {type(state).__name__}); "
                              "save one with torch.save(model.state_dict(), path)")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly, with an error that names the mismatching keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state)
    return model


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
                log: Callable[[int, dict[str, torch.Tensor]], None] = lambda it, losses: None,
                on_train: Callable[[int], None] | None = None) -> Teacher:
    """The teacher for (dataset, arch): the user's ``checkpoint``, else cached, else trained now."""
    info = data.info
    model = create_model(arch, info.num_classes, info.channels, info.image_size)
    evaluate = lambda m: evaluate_accuracy(m, data.test_x, data.test_y, lambda xb: to_float(xb, info))
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"teacher_checkpoint {checkpoint!r} does not exist")
        load_into(model, load_state_dict(path), f"teacher_checkpoint {checkpoint!r}")
        model.to(device).eval()
        return Teacher(model, arch, evaluate(model), f"checkpoint:{file_hash(str(path))}", {"checkpoint": str(path)})

    recipe = recipe or recipe_for(dataset)
    key = teacher_key(dataset, arch, recipe, seed, fingerprint(data))
    folder = resolve_cache_dir(cache_dir) / "teachers" / key
    if (folder / "meta.json").is_file() and (folder / "model.pt").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        load_into(model, load_state_dict(folder / "model.pt"), f"cached teacher {folder}")
        model.to(device).eval()
        return Teacher(model, arch, float(meta["accuracy"]), key, meta)

    torch.manual_seed(seed)
    model = create_model(arch, info.num_classes, info.channels, info.image_size).to(device)
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
