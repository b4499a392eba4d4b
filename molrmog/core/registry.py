"""Named registries: one for every list of names a user can choose from.

Schedules (`molrmog.core.schedules.SCHEDULES`), samplers (`molrmog.core.samplers.SAMPLERS`), datasets
(`molrmog.pipeline.data.DATASETS`) and VAE layouts (`molrmog.models.layouts.LAYOUTS`) are `Registry` objects; expert
kinds have their own richer registry (`molrmog.models.kinds`). The command line's choices, its help text and
the validation of a name all read the registry, so a new entry is one definition plus one
`register` call -- no name list to keep in step elsewhere:

    from molrmog.core.schedules import SCHEDULES, Schedule

    @SCHEDULES.register("mine")
    class MySchedule(Schedule):
        ...

A registry is a read-only mapping (`name in R`, `R[name]`, `list(R)`); `R.get(name)` raises a
`MolrmogError` that names the registry and its choices. Aliases resolve with `get` but are not
listed among the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from molrmog.core.errors import MolrmogError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> entry, in registration order (see the module docstring)."""

    def __init__(self, what: str):
        self.what = what  # "schedule", "sampler", ...: used in messages
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = (),
                 replace: bool = False) -> T | Callable[[T], T]:
        """Add `entry` under `name` and return it; without `entry`, a decorator that does so."""
        if entry is None:
            return lambda e: self.register(name, e, aliases=aliases, replace=replace)
        for n in (name, *aliases):
            if not isinstance(n, str) or not n or n != n.strip() or ":" in n:
                raise MolrmogError(f"a {self.what} name must be a non-empty string without ':' or spaces at its "
                                   f"ends, got {n!r}")
            if not replace and (n in self._entries or n in self._aliases):
                raise MolrmogError(f"{self.what} {n!r} is already registered; pick another name or pass "
                                   f"replace=True")
        self._entries[name] = entry
        self._aliases.pop(name, None)
        for a in aliases:
            self._aliases[a] = name
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        for a in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[a]

    def canonical(self, name: str) -> str:
        """The registered name `name` stands for (itself, or the name an alias points to)."""
        name = self._aliases.get(name, name)
        if name not in self._entries:
            raise MolrmogError(f"unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")
        return name

    def get(self, name: str) -> T:  # type: ignore[override]
        return self._entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """The registered names (aliases left out), in registration order: the command line's choices."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
