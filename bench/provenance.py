"""Provenance: content hashes of the code and the files behind a number, and the state of the git tree.

A cell's identity (:mod:`bench.grid`) covers everything that changes a figure. For code that is its
*source*: the method's own module with every module it imports from its own package (for a plugin
file: from its folder), and the harness modules whose code is part of every cell's numbers
(:data:`HARNESS_MODULES`). Sources are hashed as their abstract syntax tree without docstrings, so an
edit to a comment or a docstring re-runs nothing, while any edit to code re-runs exactly the cells it
can change. No version number is bumped by hand.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Harness code that every cell's numbers run through: the context and its step loop, the training
# loop, batch transforms, accuracy and FLOPs, and the cell's Provision/Measure stages. (The models a cell
# uses are covered by their own code, bench.models.architecture_code; teachers and derived students by
# their cache keys and bench.students.student_code.)
HARNESS_MODULES = ("bench.method", "bench.teacher_access", "bench.monitor", "bench.training", "bench.transforms", "bench.metrics",
                   "bench.provision")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _stamp(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


def source_hash(path: str) -> str:
    """Hash of a Python file's code: its AST without docstrings (comments never reach the AST)."""
    return _source_hash(*_stamp(path))


@functools.lru_cache(maxsize=None)
def _source_hash(path: str, mtime_ns: int, size: int) -> str:  # cached per version of the file
    text = Path(path).read_text(encoding="utf-8")
    return hashlib.sha256(ast.dump(_strip_docstrings(ast.parse(text))).encode()).hexdigest()[:16]


def _module_file(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec is not None else None
    return path if path and path.endswith(".py") else None


def modules_hash(names) -> str:
    """One hash over the code of the named modules (in the given order; missing ones are skipped)."""
    digest = hashlib.sha256()
    for name in names:
        path = _module_file(name) if name else None
        if path is not None:
            digest.update(f"{name}:{source_hash(path)};".encode())
    return digest.hexdigest()[:16]


def objects_hash(objects) -> str:
    """One hash over the code of functions and classes (their AST without docstrings), in order."""
    digest = hashlib.sha256()
    for obj in objects:
        tree = _strip_docstrings(ast.parse(textwrap.dedent(inspect.getsource(obj))))
        digest.update(f"{obj.__module__}.{obj.__qualname__}:{ast.dump(tree)};".encode())
    return digest.hexdigest()[:16]


def _imports(path: str, package: str | None) -> set[str]:
    """Module names imported by the file at ``path`` (relative imports resolved against ``package``)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and package:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base:
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def method_source_files(method_cls: type) -> list[str]:
    """The files whose code makes a method's numbers: its module and, transitively, every module it
    imports from its own top-level package (built-ins: ``methods``) or, for a plugin file, from the
    plugin's folder."""
    module = inspect.getmodule(method_cls)
    path = getattr(module, "__file__", None)
    if path is None:
        return []
    top = module.__name__.split(".")[0]
    folder = Path(path).resolve().parent
    seen: dict[str, str] = {}
    stack = [(module.__name__, path)]
    while stack:
        name, file = stack.pop()
        if file in seen.values():
            continue
        seen[name] = file
        package = name if file.endswith("__init__.py") else name.rpartition(".")[0]
        for imported in _imports(file, package):
            target = _module_file(imported)
            if target is None or target in seen.values():
                continue
            inside = imported.split(".")[0] == top and top != "bench"
            beside = Path(target).resolve().parent == folder and not target.endswith("__init__.py")
            if inside or beside:
                stack.append((imported, target))
    return sorted(seen.values())


def method_source_hash(method_cls: type) -> str:
    digest = hashlib.sha256()
    for file in method_source_files(method_cls):
        digest.update(f"{Path(file).name}:{source_hash(file)};".encode())
    return digest.hexdigest()[:16]


def harness_hash() -> str:
    return modules_hash(HARNESS_MODULES)


def file_hash(path: str) -> str:
    """sha256 of a file's bytes (first 16 hex digits): a checkpoint is identified by its content, not its path."""
    return _file_hash(*_stamp(str(path)))


@functools.lru_cache(maxsize=None)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def git_state() -> tuple[str, bool | None]:
    """(short commit, whether the work tree has uncommitted changes) of the harness's checkout; ("", None) outside git."""
    cwd = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        if commit.returncode != 0:
            return "", None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10, cwd=cwd)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "", None
