"""The method interface: what a plugin author learns.

A method is a class with one call, ``distill(teacher, student, ctx) -> student``, registered under a
name with :func:`register`. It declares what real data it may touch (:class:`DataAccess`) and how much
of the teacher it uses (:class:`TeacherAccess`); the :class:`DistillContext` hands it data *only as
declared*, and the teacher it receives is a view that allows *only the declared access*
(:mod:`bench.teacher_access`: top-1 labels, detached outputs, detached features, or the white-box
module), so a "data-free" or "black-box" number from this harness is one by construction.

    @register("my_kd")
    class MyKD(Method):
        data_access = DataAccess.NONE
        teacher_access = TeacherAccess.OUTPUTS

        @dataclass
        class Config(MethodConfig):
            lr: float = 1e-3
            iterations: int = 1000      # paper budget; scaled by the grid's `budget`

        def distill(self, teacher, student, ctx):
            opt = torch.optim.Adam(student.parameters(), lr=self.config.lr)
            ctx.track(opt=opt)                              # checkpointed with the student
            for step in ctx.steps(ctx.scaled(self.config.iterations), "my_kd"):
                ...                                         # one student update
                ctx.log(step, loss=loss)                    # kept every log_every steps
            return student

The harness never imports a specific method: built-ins are found by importing the ``methods``
package, third-party ones through ``--plugin file.py|module`` or the ``dfkd_bench.methods``
entry-point group.
"""
from __future__ import annotations

import contextlib
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

from bench import monitor as _monitor
from bench.config import ConfigError, from_mapping
from bench.data import DATASETS, DatasetInfo, load_images
from bench.lineage import Lineage
from bench.monitor import Budget
from bench.registry import Registry
from bench.search_space import check_space
from bench.teacher_access import CountingTeacher, TeacherAccess, TeacherAccessError  # re-exported for plugins
from bench.transforms import BatchStream, augment, to_float


class DataAccess(str, enum.Enum):
    """How much of the task's real training data a method may read."""

    NONE = "none"  # no real images at all (data-free)
    ALT = "alt"  # out-of-domain real images only (e.g. MNIST digits for a Fashion-MNIST teacher)
    FEW = "few"  # n samples of the training set (the method's `n_samples` config field)
    FULL = "full"  # the whole labelled training set

    @property
    def rank(self) -> int:
        return list(DataAccess).index(self)


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
        calls ``ctx.evaluate(student)`` at its evaluation points (it gets None back) and
        the harness records the best test accuracy at those points in ``student_acc_best``.
      few_labels: a FEW method that reads the labels of its few samples (see :meth:`reads_labels`).
      search_space: ``{field: Float | Int | Choice}`` (:mod:`bench.search_space`), the distribution its
        tunable fields are drawn from by ``bench tune``; it must contain the paper's values.
      validation_feedback: True for a method that selects on labelled validation accuracy
        (``ctx.evaluate`` returns it); False (the default) gives every method None there.
    """

    name: ClassVar[str] = ""
    data_access: ClassVar[DataAccess] = DataAccess.NONE
    teacher_access: ClassVar[TeacherAccess] = TeacherAccess.OUTPUTS
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    preset_for_dataset: ClassVar[dict[str, str]] = {}
    tracks_best: ClassVar[bool] = False
    few_labels: ClassVar[bool] = False
    validation_feedback: ClassVar[bool] = False
    # the tunable fields' distribution for the equal-tuning protocol (bench.search_space; docs/tuning.md)
    search_space: ClassVar[dict[str, Any]] = {}

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

    def reads_labels(self) -> bool:
        """Whether a FEW method reads the labels of its samples (override where the config decides)."""
        return self.few_labels

    def distill(self, teacher: "CountingTeacher", student: nn.Module, ctx: "DistillContext") -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# registry and plugins

METHODS: Registry[type[Method]] = Registry("method")
_BUILTINS_LOADED = False


def register(name: str | None = None) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` under ``name`` (default: class name, lower case)."""

    def decorator(cls: type[Method]) -> type[Method]:
        key = name or cls.__name__.lower()
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({key!r}) must decorate a subclass of bench.method.Method, got {cls!r}")
        existing = METHODS._entries.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {key!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, MethodConfig)):
            raise TypeError(f"{cls.__name__}.Config must be a @dataclass subclass of MethodConfig")
        cls.name = key
        check_space(cls)  # a space that leaves out the paper's value is refused here, at load
        return METHODS.register(key, replace=True)(cls)  # a plugin re-imported in one process registers again

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
    if name not in METHODS.names():
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(METHODS.names())}")
    return METHODS.get(name)


def list_methods() -> dict[str, type[Method]]:
    _load_builtins()
    return dict(METHODS.items())


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


class DistillContext:
    """What the harness gives a method: metadata, data only as declared, the budget, the step loop, logging.

    Built by the harness's Provision stage (:mod:`bench.provision`) from the method's declared access:
    a NONE method's context holds the dataset's metadata and nothing else; ALT can load other datasets'
    images (of another source); FEW holds exactly its n images (labels only if it declared it reads them);
    FULL holds the training split. The validation and test splits are never in a context.
    """

    def __init__(self, *, info: DatasetInfo, data_access: DataAccess, device: torch.device, seed: int, out_dir: Path,
                 budget: Budget | float = 1.0, amp: bool = False, data_root: Path | None = None,
                 train: tuple[torch.Tensor, torch.Tensor] | None = None,
                 few: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 lineage: Lineage | None = None,
                 on_log: Callable[[int, dict[str, float]], None] | None = None,
                 on_phase: Callable[[str, int], None] | None = None):
        self.info = info
        self.data_access = data_access
        self.device = torch.device(device)
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.compute = budget if isinstance(budget, Budget) else Budget(fraction=float(budget))
        self.data_root = data_root
        self.lineage = lineage  # how a derived student came from the teacher (kept channels...), else None
        self.generator = torch.Generator().manual_seed(seed)
        # the grid allows bf16 autocast and the device computes bf16 natively: decided once, not per autocast()
        self.amp_active = amp and native_bf16(self.device)
        self.real_samples_used = 0
        self._train = train
        self._few = few
        self._on_log, self._on_phase = on_log, on_phase
        self._curve = None
        self._phase: tuple[int, int] | None = None  # (total, log_every) of the running ctx.steps loop

    # ---- metadata and budget
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.info.channels, self.info.image_size, self.info.image_size)

    @property
    def budget(self) -> float:
        """The fraction of the paper's budget (compute caps, if any, are enforced by :meth:`steps`)."""
        return self.compute.fraction

    def scaled(self, paper_count: int) -> int:
        """``paper_count`` iterations (or epochs) scaled by the grid's budget fraction, at least 1."""
        return max(1, round(paper_count * self.compute.fraction))

    def plan_steps(self, total: int, queries_per_step: float | None = None) -> int:
        """``total`` steps (already scaled) cut to the cell's caps where they are known in advance:
        a student-step cap, and a teacher-query cap given the teacher queries one step makes. Build
        length-dependent schedules (cosine, milestones) on this number. Under a seconds cap the method
        keeps its nominal length and :meth:`steps` stops it when the time is up, wherever its schedule is."""
        mon = _monitor.active()
        return mon.plan(total, queries_per_step) if mon is not None else max(1, int(total))

    def autocast(self):
        """bf16 autocast when :attr:`amp_active`; a no-op elsewhere."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp_active)

    # ---- the step loop
    def steps(self, total: int, name: str, *, student: bool = True, log_every: int = 50) -> Iterator[int]:
        """The method's loop: ``for step in ctx.steps(total, "kd"): ...`` yields 1..total.

        The harness drives the progress bar, the logging cadence (see :meth:`log`), the compute caps (the
        loop ends early, before a step would cross one), the anytime validation curve and the in-cell
        checkpoints from here; after a resume the loop starts where the checkpoint left it.
        ``student=False`` marks a loop that does not train the student (e.g. image synthesis): its steps
        are not student steps."""
        total = max(0, int(total))
        mon = _monitor.active()
        self._phase = (total, max(1, log_every))
        try:
            if mon is None:
                self.phase(name, total)
                yield from range(1, total + 1)
            else:
                yield from mon.steps(total, name, student, max(1, log_every))
        finally:
            self._phase = None

    @contextlib.contextmanager
    def queries_for(self, purpose: str) -> Iterator[None]:
        """Tag the teacher queries made inside the block: ``with ctx.queries_for("generator"): ...``. The row's
        ``teacher_queries_by`` breaks the total down by tag (e.g. DFME's gradient estimate vs its student)."""
        mon = _monitor.active()
        if mon is None:
            yield
            return
        before, mon.counter.purpose = mon.counter.purpose, purpose
        try:
            yield
        finally:
            mon.counter.purpose = before

    def track(self, **objects: Any) -> None:
        """Register state that in-cell checkpoints save and restore: modules, optimisers, schedulers, batch
        streams, pools, tensors (anything with ``state_dict``/``load_state_dict``). The student the method
        received is tracked as ``student``; ``ctx.track(student=other)`` makes ``other`` the model the harness
        evaluates on its anytime curve."""
        mon = _monitor.active()
        if mon is not None:
            for name, obj in objects.items():
                mon.track(name, obj)

    # ---- data, only as declared
    def _require(self, *allowed: DataAccess, what: str) -> None:
        if self.data_access not in allowed:
            raise DataAccessError(
                f"{what} needs data_access {' or '.join(a.value for a in allowed)}, "
                f"but this method declared data_access={self.data_access.value!r}")

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled training split (without the validation split) as (uint8 images, labels) on the device (FULL only)."""
        self._require(DataAccess.FULL, what="train_data()")
        assert self._train is not None
        self.real_samples_used = self._train[0].shape[0]
        return self._train

    def train_batches(self, batch_size: int, *, augment_images: bool = True) -> BatchStream:
        """Endless shuffled, augmented, normalised training batches (FULL only); checkpointed."""
        x, y = self.train_data()
        return self.batches(x, y, batch_size, augment_images=augment_images)

    def batches(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, *, augment_images: bool = False,
                prepare: bool = True, shuffle: bool = True, drop_last: bool = True, name: str | None = None) -> BatchStream:
        """Endless batches over tensors the method holds (few samples, alternative images, a pool):
        reshuffled each epoch from ``ctx.generator``, uint8 images prepared (:meth:`prepare`) unless
        ``prepare=False``; tracked for checkpoints under ``name`` (default: one per call)."""
        transform = (lambda xb: self.prepare(xb, augment_images=augment_images)) if prepare else None
        stream = BatchStream(x, y, batch_size, generator=self.generator, shuffle=shuffle, drop_last=drop_last,
                             transform=transform)
        self._streams = getattr(self, "_streams", 0) + 1
        self.track(**{name or f"batches_{self._streams}": stream})
        return stream

    def few_samples(self, n: int, *, labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``n`` of this method's few training images (uint8, on the device; FEW only).

        At most the method's declared ``n_samples``. Labels only when the method declared that it reads
        them (:meth:`Method.reads_labels`)."""
        self._require(DataAccess.FEW, what="few_samples()")
        if self._few is None:
            raise DataAccessError("a FEW method must declare how many samples it reads (config field n_samples)")
        x, y = self._few
        if n > x.shape[0]:
            raise DataAccessError(f"few_samples({n}) asks for more than the declared n_samples={x.shape[0]}")
        if labels and y is None:
            raise DataAccessError("few_samples(labels=True): this method did not declare that it reads labels "
                                  "(class attribute few_labels = True, or override Method.reads_labels)")
        self.real_samples_used = max(self.real_samples_used, n)
        return x[:n], (y[:n] if labels else None)

    def alt_images(self, dataset: str) -> torch.Tensor:
        """The images of another dataset (uint8, on the device), shaped like this one's (ALT only).

        The alternative set must come from another *source* than the task (e.g. ``mnist_5k`` and
        ``mnist_t10k`` are MNIST, so neither serves an MNIST teacher)."""
        self._require(DataAccess.ALT, what="alt_images()")
        if dataset not in DATASETS and not dataset.startswith("imagefolder:"):
            raise ConfigError(f"alt_images({dataset!r}): unknown dataset; valid: {', '.join(DATASETS.names())}")
        images_source = _source_of(dataset, self.data_root)
        if dataset == self.info.name or images_source == self.info.source:
            raise DataAccessError(f"alt_images({dataset!r}) would read images of the teacher's own source "
                                  f"{self.info.source!r}; alternative data must come from another source")
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
        """Start a named phase of ``total`` steps on the progress bar (``steps`` does this itself)."""
        if self._on_phase is not None:
            self._on_phase(name, total)

    def log(self, step: int, named: Mapping[str, float | torch.Tensor] | None = None, /,
            **scalars: float | torch.Tensor) -> None:
        """Record scalars at ``step`` in the cell's training curve: ``ctx.log(step, loss=...)``.

        Inside a :meth:`steps` loop only every ``log_every``-th step and the last are kept, so a method
        may call it every step; the kept ones sync with the device. Outside a loop every call is kept.
        A NaN or infinite value fails the cell."""
        if self._phase is not None:
            total, every = self._phase
            if step % every and step != total:
                return
        self._record(step, {**(named or {}), **scalars})

    def _record(self, step: int, scalars: Mapping[str, float | torch.Tensor]) -> None:
        tensors = {k: v for k, v in scalars.items() if torch.is_tensor(v)}
        values = dict(zip(tensors, torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).tolist())) \
            if tensors else {}
        values = {k: values[k] if k in values else float(v) for k, v in scalars.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}: {values}")
        if self._curve is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._curve = open(self.out_dir / "curve.jsonl", "a", encoding="utf-8")
        self._curve.write(json.dumps({"step": step, **values}) + "\n")
        self._curve.flush()
        if self._on_log is not None:
            self._on_log(step, values)

    def evaluate(self, student: nn.Module, step: int | None = None) -> float | None:
        """The method's own evaluation point, for protocols that evaluate per epoch. For ``tracks_best``
        methods the harness records the best *test* accuracy over these points (``student_acc_best``),
        which no method ever sees. Returns None: no labelled feedback reaches a method, unless it declares
        ``validation_feedback = True`` (it then gets validation accuracy, percent, and its row counts the
        validation images as real samples used and reports ``validation_feedback``)."""
        mon = _monitor.active()
        if mon is None:
            return None
        acc = mon.method_evaluation(student)
        if step is not None and acc is not None:
            self._record(step, {"val_acc": acc})
        return acc

    def close(self) -> None:
        if self._curve is not None:
            self._curve.close()
            self._curve = None


def _source_of(dataset: str, root: Path | None) -> str:
    """The image source of a registered dataset (loaded once; small sets only are ever alternative data)."""
    from bench.data import load_dataset

    return load_dataset(dataset, root=root, device="cpu").info.source or dataset
