"""Tracks: which hyperparameters a method entry runs with, and the ``tuning`` label its rows carry.

A grid's method entry chooses a track with ``preset`` (docs/tuning.md):

- ``paper`` (or no preset): the paper's or official script's values for the nearest dataset (the
  method's preset for the dataset, else its Config defaults). Rows say ``tuning: paper``; an entry
  whose ``params`` override a field of the method's search space says ``default`` (hand-set values).
- ``tuned``: the paper values with the tuned values of the tuned-presets file on top. The values were
  chosen by ``bench tune`` on a *development* task of the same data family (:data:`FAMILIES`: MNIST
  for the grey 32-px sets), never on the scored task. Rows say
  ``tuned:<dataset>:<trials>@<cap>``.
- ``oracle``: tuned on the scored dataset's own validation split: an upper bound, labelled ``oracle``
  everywhere and never the headline.
- any other name: one of the method's named presets (hand settings: ``default``).

``tuned`` and ``oracle`` are refused, with the command that tunes, when the file has no entry for the
method and family, or when the method's code has changed since it was tuned.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from bench.config import ConfigError

TRACKS = ("paper", "tuned", "oracle")
# Data families: datasets whose images share a format (channels, size, kind), so that values tuned on one carry
# to another. A dataset outside them is a family of its own.
FAMILIES = {"grey32": ("mnist", "fashion_mnist", "digits", "mnist_5k", "mnist_t10k"),
            "rgb32": ("cifar10", "cifar100", "svhn")}
# the study grid that tunes each record key (a family, or oracle:<dataset>)
TUNE_GRIDS = {"grey32": "examples/studies/tune_grey32.yaml",
              "oracle:fashion_mnist": "examples/studies/tune_oracle_fmnist.yaml"}


def default_tuned_file() -> Path:
    """The tuned-presets file in the repository (``bench/tuned.yaml``)."""
    return Path(str(resources.files("bench") / "tuned.yaml"))


def family(dataset: str) -> str:
    """The data family of ``dataset`` (:data:`FAMILIES`; the dataset's own name outside them)."""
    return next((name for name, members in FAMILIES.items() if dataset in members), dataset)


def record_key(dataset: str, track: str) -> str:
    """The key of a tuned record: the family (``tuned``) or ``oracle:<dataset>``."""
    return f"oracle:{dataset}" if track == "oracle" else family(dataset)


def read_tuned(path: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """``{method: {key: record}}`` from a tuned-presets file (empty if it does not exist). Read once per version
    of the file (a grid resolves every tuned entry on every dataset); callers must not modify what it returns."""
    path = Path(path) if path else default_tuned_file()
    if not path.is_file():
        return {}
    stat = path.stat()
    return _read_tuned(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_tuned(path_text: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    path = Path(path_text)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict):
        raise ConfigError(f"{path}: 'methods' must be a mapping method -> family -> record")
    return methods


def cap_text(budget: Mapping[str, Any]) -> str:
    """A budget in a tuning label: ``45s``, ``200000q``, ``500steps``, or ``x0.1`` for a fraction alone."""
    units = {"seconds": "s", "teacher_queries": "q", "student_steps": "steps"}
    caps = [f"{budget[k]:g}{u}" for k, u in units.items() if budget.get(k) is not None]
    fraction = budget.get("fraction", 1.0)
    if fraction != 1.0 or not caps:
        caps.insert(0, f"x{fraction:g}")
    return "+".join(caps)


def tuning_label(record: Mapping[str, Any], track: str) -> str:
    if track == "oracle":
        return "oracle"
    task = record["task"]
    return f"tuned:{task['dataset']}:{record['trials']}@{cap_text(task['budget'])}"


def tune_command(method: str, key: str, dataset: str, record: Mapping[str, Any] | None = None) -> str:
    """The command that (re-)tunes ``method`` for a record key (the study grid that did, or the documented one)."""
    grid = (record or {}).get("grid") or TUNE_GRIDS.get(key) or (
        f"<a grid whose tune: block has dataset: {dataset}{', track: oracle' if key.startswith('oracle:') else ''}>")
    return f"bench tune --grid {grid} --only {method}"


def resolve(method_cls: type, dataset: str, preset: str | None, params: Mapping[str, Any] | None, where: str,
            tuned_file: Path | str | None = None) -> tuple[str | None, Any, str]:
    """``(preset, typed config, tuning label)`` for a method entry on ``dataset`` (see the module doc)."""
    from bench.provenance import method_source_hash

    params = dict(params or {})
    name = method_cls.name
    if preset in (None, "paper"):
        chosen, config = method_cls.resolve_config(dataset, None, params, f"{where}.params")
        hand_set = sorted(set(params) & set(method_cls.search_space))
        return chosen, config, "default" if hand_set else "paper"
    if preset not in ("tuned", "oracle"):
        if preset not in method_cls.presets:
            raise ConfigError(f"{where}: unknown preset {preset!r} for method {name!r}; valid: the tracks "
                              f"{', '.join(TRACKS)}, or a named preset: {', '.join(sorted(method_cls.presets)) or '(none)'}")
        chosen, config = method_cls.resolve_config(dataset, preset, params, f"{where}.params")
        return chosen, config, "default"
    key = record_key(dataset, preset)
    record = read_tuned(tuned_file).get(name, {}).get(key)
    if record is None:
        what = f"the {dataset} validation split (oracle)" if preset == "oracle" else f"data family {family(dataset)!r}"
        command = tune_command(name, key, dataset)
        raise ConfigError(f"{where}: preset {preset!r}: the tuned-presets file {tuned_file or default_tuned_file()} "
                          f"has no entry for method {name!r} on {what}; tune it first: {command}")
    current = method_source_hash(method_cls)
    if record.get("code_hash") != current:
        raise ConfigError(f"{where}: preset {preset!r}: method {name!r} was tuned ({key}) on code "
                          f"{record.get('code_hash')}, and its code is now {current}; the tuned values may no longer "
                          f"hold. Re-tune: {tune_command(name, key, dataset, record)}")
    chosen, config = method_cls.resolve_config(dataset, None, {**record["values"], **params}, f"{where}.params")
    return chosen, config, tuning_label(record, preset)
