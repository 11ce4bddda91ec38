"""One generic registry for everything the harness finds by name: models, datasets, methods, student kinds.

timm's ``register_model``/``create_model`` and lm-evaluation-harness's task registry in one small type:
a name maps to an entry (a class or a builder function); an *open form* ``prefix:<rest>`` maps every
name that starts with ``prefix:`` to one entry that receives ``<rest>`` (``timm:<name>``,
``imagefolder:<path>``, ``pruned:<criterion>:<ratio>``). Unknown names raise :class:`ConfigError`
naming the kind, the bad value and every valid choice.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from bench.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries of one kind (e.g. ``Registry("model")``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._prefixes: dict[str, T] = {}
        self._forms: dict[str, str] = {}

    def register(self, name: str, *, prefix: str | None = None, replace: bool = False) -> Callable[[T], T]:
        """Decorator: register an entry under ``name``; with ``prefix="<arg>"`` the open form ``name:<arg>``
        (the text is how error messages and listings show the argument, e.g. ``"<path>"``).

        A name may not contain ':' (reserved for open forms) and is registered once, unless ``replace``."""
        table = self._prefixes if prefix is not None else self._entries
        if not name or ":" in name:
            raise ValueError(f"cannot register {self.kind} {name!r}: a name is non-empty and has no colon")
        if name in table and not replace:
            raise ValueError(f"cannot register {self.kind} {name!r}: the name is taken "
                             f"(registered: {', '.join(self.names(open_forms=True))})")

        def decorator(entry: T) -> T:
            table[name] = entry
            if prefix is not None:
                self._forms[name] = prefix
            return entry

        return decorator

    def resolve(self, name: str) -> tuple[T, str | None]:
        """``(entry, rest)``: ``rest`` is None for a plain name, the text after ``prefix:`` for an open form."""
        if name in self._entries:
            return self._entries[name], None
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self._prefixes and rest:
            return self._prefixes[prefix], rest
        raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names(open_forms=True))}")

    def get(self, name: str) -> T:
        """The entry of a plain name (open forms: use :meth:`resolve`)."""
        entry, rest = self.resolve(name)
        if rest is not None:
            raise ConfigError(f"{self.kind} {name!r} is an open form; resolve it with its argument")
        return entry

    def has_prefix(self, prefix: str) -> bool:
        """Whether ``prefix:<...>`` is a registered open form."""
        return prefix in self._prefixes

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.resolve(name)
        except ConfigError:
            return False
        return True

    def names(self, *, open_forms: bool = False) -> list[str]:
        """Registered plain names, sorted; with ``open_forms`` also ``prefix:<...>`` for each open form."""
        names = sorted(self._entries)
        return names + [f"{p}:{self._forms[p]}" for p in sorted(self._prefixes)] if open_forms else names

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __len__(self) -> int:
        return len(self._entries)
