"""A small name -> class registry whose members live one per module in a package."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from compressor.errors import CompressorError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes; imports every module of ``package`` on first use.

    Args:
        package: Dotted name of the package whose modules register members.
        what: What a member is called in messages ("criterion", "recovery method").
        hint: Where the user can see the choices, appended to the unknown-name error.
    """

    def __init__(self, package: str, what: str, hint: str = "") -> None:
        self._package = package
        self._what = what
        self._hint = hint
        self._classes: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: add ``cls`` under ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name or (name in self._classes and self._classes[name] is not cls):
            raise ValueError(f"{self._what} name {name!r} is empty or already registered")
        self._classes[name] = cls
        return cls

    def _load_all(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self._package)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "base":
                importlib.import_module(f"{self._package}.{info.name}")
        self._loaded = True

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_all()
        return sorted(self._classes)

    def cls(self, name: str) -> type[T]:
        """The class registered as ``name``; a one-line error naming the choices otherwise."""
        self._load_all()
        if name not in self._classes:
            raise CompressorError(
                f"unknown {self._what} {name!r}; choose one of: {', '.join(self.names())}{self._hint}"
            )
        return self._classes[name]

    def create(self, name: str) -> T:
        """A new instance of the member registered as ``name``."""
        return self.cls(name)()
