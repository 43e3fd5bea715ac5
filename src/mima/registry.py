"""Name -> class registries with lazy entries and helpful errors for unknown names."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from .errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """Raised by [`Registry.get`] for a name that is not registered.

    It is a `KeyError` for mapping-like callers and a [`~mima.errors.ConfigError`] so the CLI prints it as one line.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A registry mapping names to subclasses of `base`.

    Args:
        kind (`str`):
            What is registered, e.g. `"attack"`; used in error messages.
        base (`type`):
            Every registered class must be a subclass of it.

    Example:

    ```python
    attacks = Registry("attack", Attack)

    @attacks.register("lora")
    class LoraAttack(Attack): ...

    attacks.register("dreambooth", "mima.attacks.dreambooth:DreamBoothAttack")  # imported on first `get`
    attacks.get("lora")
    ```
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, type[T] | str] = {}

    @overload
    def register(self, name: str, obj: None = None) -> Callable[[type[T]], type[T]]: ...

    @overload
    def register(self, name: str, obj: type[T]) -> type[T]: ...

    @overload
    def register(self, name: str, obj: str) -> str: ...

    def register(self, name: str, obj: type[T] | str | None = None) -> Callable[[type[T]], type[T]] | type[T] | str:
        """Register a class, a lazy `"package.module:attr"` reference, or return a decorator doing so.

        Args:
            name (`str`):
                Name to register under; must not be registered yet.
            obj (`type` or `str`, *optional*):
                The class, or an import path `"package.module:attr"` resolved on first [`~Registry.get`]. When
                omitted, a class decorator is returned.

        Returns:
            The decorator when `obj` is `None`, otherwise `obj` unchanged.

        Raises:
            `ValueError`: If `name` is already registered or a lazy path is malformed.
            `TypeError`: If `obj` is a class that is not a subclass of `base`.
        """
        if obj is None:

            def decorator(cls: type[T]) -> type[T]:
                self.register(name, cls)
                return cls

            return decorator
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            if not module or not attr:
                raise ValueError(f"lazy {self.kind} '{name}' must look like 'package.module:attr', got '{obj}'")
        else:
            self._check_type(name, obj)
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> type[T]:
        """Return the class registered as `name`, importing it first if it is a lazy entry.

        Args:
            name (`str`):
                A registered name.

        Raises:
            [`UnknownNameError`]: If `name` is not registered; the message suggests the closest valid name.
            `TypeError`: If a lazy entry resolves to something that is not a subclass of `base`.
        """
        try:
            entry = self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None
        if isinstance(entry, str):
            entry = self._resolve(name, entry)
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.base.__name__}, names={self.names()})"

    def _resolve(self, name: str, path: str) -> type[T]:
        module_name, _, attr = path.partition(":")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ImportError(f"lazy {self.kind} '{name}': '{path}' has no attribute '{part}'") from None
        self._check_type(name, obj)
        return obj

    def _check_type(self, name: str, obj: object) -> None:
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(f"{self.kind} '{name}' must be a subclass of {self.base.__name__}, got {obj!r}")

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        return f"unknown {self.kind} '{name}'{hint} valid: {', '.join(names) or '(none)'}"


def lazy_package(package: str, exports: dict[str, str], method_modules: tuple[str, ...]) -> Callable[[str], object]:
    """A module `__getattr__` for a family package: names resolve on first use, and reading any of them first
    imports every method module (each registers itself), so that importing the package's config stays light."""
    import importlib

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        for module in method_modules:
            importlib.import_module(module)
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
