"""The method interface: what a plugin author learns.

A method is a class with one call, ``distill(teacher, student, ctx) -> student``, registered under a
name with :func:`register`. It declares what real data it may touch (:class:`DataAccess`) and how it
uses the teacher (:class:`TeacherAccess`); the :class:`DistillContext` hands it data *only as
declared*, so a "data-free" number from this harness is data-free by construction.

    @register("my_kd")
    class MyKD(Method):
        data_access = DataAccess.NONE
        teacher_access = TeacherAccess.OUTPUTS

        @dataclass
        class Config(MethodConfig):
            lr: float = 1e-3
            iterations: int = 1000      # paper budget; scaled by the grid's `budget`

        def distill(self, teacher, student, ctx):
            ...
            return student

The harness never imports a specific method: built-ins are found by importing the ``methods``
package, third-party ones through ``--plugin file.py|module`` or the ``dfkd_bench.methods``
entry-point group.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn

from bench.config import ConfigError, from_mapping
from bench.data import DatasetInfo, ImageData, augment, few_sample_indices, iterate_batches, load_images, to_float


class DataAccess(str, enum.Enum):
    """How much of the task's real training data a method may read."""

    NONE = "none"  # no real images at all (data-free)
    ALT = "alt"  # out-of-domain real images only (e.g. MNIST digits for a Fashion-MNIST teacher)
    FEW = "few"  # n samples of the training set (the method's `n_samples` config field)
    FULL = "full"  # the whole labelled training set


class TeacherAccess(str, enum.Enum):
    """How a method uses the teacher (recorded in the results; not enforced)."""

    NONE = "none"  # no teacher (e.g. a student trained on labels)
    OUTPUTS = "outputs"  # logits only: a black-box teacher behind an API would do
    FEATURES = "features"  # inner activations
    GRADIENTS = "gradients"  # back-propagates through the teacher (white box)


class DataAccessError(PermissionError):
    """A method asked for data its declared :class:`DataAccess` does not allow."""


@dataclass
class MethodConfig:
    """Base of every method's typed hyperparameters. Subclasses add fields with paper defaults."""

    def validate(self) -> None:
        """Check value ranges; raise :class:`ConfigError`. Override and call super()."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be finite, got {value!r}")


class Method:
    """Base class of every distillation method.

    Class attributes a subclass sets:
      data_access, teacher_access: see the enums.
      Config: a :class:`MethodConfig` dataclass with the paper's defaults.
      presets: ``{preset_name: {field: value}}`` for per-dataset paper settings.
      preset_for_dataset: ``{dataset_name: preset_name}``; datasets not listed use the Config defaults.
      tracks_best: True where the paper's protocol reports the best test-set epoch; the method then
        calls ``ctx.evaluate(student)`` at its evaluation points and the row gets ``student_acc_best``.
    """

    name: ClassVar[str] = ""
    data_access: ClassVar[DataAccess] = DataAccess.NONE
    teacher_access: ClassVar[TeacherAccess] = TeacherAccess.OUTPUTS
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_for_dataset: ClassVar[dict[str, str]] = {}
    tracks_best: ClassVar[bool] = False

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def resolve_config(cls, dataset: str, preset: str | None = None, overrides: Mapping[str, Any] | None = None,
                       where: str = "") -> tuple[str | None, MethodConfig]:
        """The typed config for ``dataset``: defaults, then the preset, then ``overrides``."""
        where = where or f"method {cls.name!r} params"
        if preset is None:
            preset = cls.preset_for_dataset.get(dataset)
        elif preset not in cls.presets:
            raise ConfigError(f"{where}: unknown preset {preset!r} for method {cls.name!r}; "
                              f"valid presets: {', '.join(sorted(cls.presets)) or '(none)'}")
        values = {**(cls.presets.get(preset, {}) if preset else {}), **dict(overrides or {})}
        return preset, from_mapping(cls.Config, values, where)

    def real_samples_limit(self, info: DatasetInfo) -> int | None:
        """How many training samples a FEW method may read: by default its ``n_samples`` field.

        Override to derive it from the dataset (e.g. a fraction of ``info.train_size``)."""
        return getattr(self.config, "n_samples", None)

    def distill(self, teacher: "CountingTeacher", student: nn.Module, ctx: "DistillContext") -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# registry and plugins

_REGISTRY: dict[str, type[Method]] = {}
_BUILTINS_LOADED = False


def register(name: str | None = None) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` under ``name`` (default: class name, lower case)."""

    def decorator(cls: type[Method]) -> type[Method]:
        key = name or cls.__name__.lower()
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({key!r}) must decorate a subclass of bench.method.Method, got {cls!r}")
        existing = _REGISTRY.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {key!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, MethodConfig)):
            raise TypeError(f"{cls.__name__}.Config must be a @dataclass subclass of MethodConfig")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("methods")
        for entry in importlib.metadata.entry_points(group="dfkd_bench.methods"):
            entry.load()


def get_method(name: str) -> type[Method]:
    """The registered method class ``name``; unknown names list the valid ones."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> dict[str, type[Method]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


class PluginError(ImportError):
    """A plugin named by the user could not be imported."""


def load_plugin(spec: str) -> None:
    """Import a plugin: a path to a ``.py`` file or an importable module name.

    Only code the user named is run. Its ``@register`` decorators add its methods.
    """
    _load_builtins()
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise PluginError(f"plugin file {spec!r} does not exist")
            module_name = f"dfkd_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise PluginError(f"cannot load plugin file {spec!r}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except PluginError:
        raise
    except Exception as exc:  # the plugin's own code failed: report it as a plugin error, with its cause
        raise PluginError(f"plugin {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# the teacher as methods see it


class CountingTeacher(nn.Module):
    """The frozen, eval-mode teacher, counting every image passed through it.

    ``teacher_queries`` in the results is this count: for a data-free method, queries to the teacher
    are its real cost. White-box methods reach layers through ``.module`` (forward hooks) but run
    the teacher through this wrapper so that their queries are counted.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.queries = 0

    def train(self, mode: bool = True) -> "CountingTeacher":
        # The teacher stays in eval mode whatever a method calls.
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        return self.module(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        return self.module.forward_features(x)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate feature and logits from one forward."""
        self.queries += x.shape[0]
        features = self.module.forward_features(x)
        return features, self.module.forward_head(features)


# ---------------------------------------------------------------------------------------------
# the context


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively, so bf16 autocast speeds it up instead of emulating.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: oneDNN's bf16 kernels need AVX512-BF16 or AMX
    (e.g. AMD Zen 4, Intel Sapphire Rapids); elsewhere bf16 on the CPU is emulated and slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


class NonFiniteError(FloatingPointError):
    """A logged loss became NaN or infinite."""


@dataclass
class DistillContext:
    """What the harness gives a method: device, data as declared, budget, logging, evaluation."""

    data: ImageData  # never handed out whole: methods go through the accessors below
    data_access: DataAccess
    device: torch.device
    budget: float
    seed: int
    out_dir: Path
    amp: bool = False  # bf16 autocast allowed (used where the device computes bf16 natively: amp_active)
    few_limit: int | None = None
    data_root: Path | None = None  # where official dataset files are looked up (alternative data)
    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_phase: Callable[[str, int], None] | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        # the grid allows bf16 autocast and the device computes bf16 natively: decided once, not per autocast()
        self.amp_active = self.amp and native_bf16(self.device)
        self.real_samples_used = 0
        self.best_acc: float | None = None
        self.evaluations: list[tuple[int, float]] = []
        self._few_indices: torch.Tensor | None = None
        self._curve = None

    # ---- metadata
    @property
    def info(self) -> DatasetInfo:
        return self.data.info

    @property
    def num_classes(self) -> int:
        return self.data.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        i = self.data.info
        return (i.channels, i.image_size, i.image_size)

    def scaled(self, paper_count: int) -> int:
        """``paper_count`` iterations (or epochs) scaled by the grid's budget, at least 1."""
        return max(1, round(paper_count * self.budget))

    def autocast(self):
        """bf16 autocast when :attr:`amp_active`; a no-op elsewhere."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp_active)

    # ---- data, only as declared
    def _require(self, *allowed: DataAccess, what: str) -> None:
        if self.data_access not in allowed:
            raise DataAccessError(
                f"{what} needs data_access {' or '.join(a.value for a in allowed)}, "
                f"but this method declared data_access={self.data_access.value!r}")

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole labelled training set as (uint8 images, labels) on the device (FULL only)."""
        self._require(DataAccess.FULL, what="train_data()")
        self.real_samples_used = self.data.train_x.shape[0]
        return self.data.train_x, self.data.train_y

    def train_batches(self, batch_size: int, *, augment_images: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled, augmented, normalised training batches (FULL only)."""
        x, y = self.train_data()
        while True:
            for xb, yb in iterate_batches(x, y, batch_size, shuffle=True, generator=self.generator, drop_last=True):
                yield self.prepare(xb, augment_images=augment_images), yb

    def few_samples(self, n: int, *, labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` training images (uint8, on the device), the same ones on every call (FEW only).

        Labels are returned only when asked for. Asking for more than the method's declared
        ``n_samples`` raises :class:`DataAccessError`.
        """
        self._require(DataAccess.FEW, what="few_samples()")
        if self.few_limit is None:
            raise DataAccessError("a FEW method must declare how many samples it reads (config field n_samples)")
        if n > self.few_limit:
            raise DataAccessError(f"few_samples({n}) asks for more than the declared n_samples={self.few_limit}")
        if self._few_indices is None:
            self._few_indices = few_sample_indices(self.data.train_y.cpu(), self.few_limit, seed=self.seed).to(self.data.train_x.device)
        idx = self._few_indices[:n]
        self.real_samples_used = max(self.real_samples_used, n)
        return self.data.train_x[idx], (self.data.train_y[idx] if labels else None)

    def alt_images(self, dataset: str) -> torch.Tensor:
        """The training images of another dataset (uint8, on the device), shaped like this one's (ALT only).

        The alternative set must differ from the teacher's own dataset."""
        self._require(DataAccess.ALT, what="alt_images()")
        if dataset == self.info.name:
            raise DataAccessError(f"alt_images({dataset!r}) would read the teacher's own training data")
        return load_images(dataset, like=self.info, root=self.data_root, device=self.device)

    def prepare(self, x_uint8: torch.Tensor, *, augment_images: bool = False) -> torch.Tensor:
        """uint8 images -> normalised float model input (optionally with the dataset's augmentation)."""
        x = to_float(x_uint8, self.info)
        return augment(x, self.info.augment, self.generator) if augment_images else x

    def noise(self, batch_size: int) -> torch.Tensor:
        """Gaussian images in the normalised input space (the data-free floor's inputs)."""
        return torch.randn((batch_size, *self.input_shape), device=self.device)

    # ---- logging and evaluation
    def phase(self, name: str, total: int) -> None:
        """Start a named phase of ``total`` steps (drives the progress bar)."""
        if self.on_phase is not None:
            self.on_phase(name, total)

    def log(self, step: int, named: Mapping[str, float | torch.Tensor] | None = None, /,
            **scalars: float | torch.Tensor) -> None:
        """Record scalars at ``step`` in the cell's training curve: ``ctx.log(it, loss=...)``, or
        ``ctx.log(it, {"loss": ...})`` (the form :func:`bench.training.train` calls). Syncs with the
        device: call at log points only. A NaN or infinite value fails the cell."""
        scalars = {**(named or {}), **scalars}
        values = {k: float(v.detach().float().item()) if torch.is_tensor(v) else float(v) for k, v in scalars.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}: {values}")
        if self._curve is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._curve = open(self.out_dir / "curve.jsonl", "a", encoding="utf-8")
        self._curve.write(json.dumps({"step": step, **values}) + "\n")
        self._curve.flush()
        if self.on_log is not None:
            self.on_log(step, values)

    def evaluate(self, student: nn.Module, step: int | None = None) -> float:
        """Test-set top-1 accuracy (percent), recorded for the paper protocol's best-on-test column."""
        from bench.metrics import evaluate_accuracy

        acc = evaluate_accuracy(student, self.data.test_x, self.data.test_y, lambda xb: to_float(xb, self.info))
        self.evaluations.append((step if step is not None else len(self.evaluations), acc))
        self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
        if step is not None:
            self.log(step, test_acc=acc)
        return acc

    def close(self) -> None:
        if self._curve is not None:
            self._curve.close()
            self._curve = None
