"""Small class helpers for the public API, after trio's (``trio._util``)."""

from __future__ import annotations

import contextlib

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
    C = TypeVar("C", bound=type)

__all__ = ["NoPublicConstructor", "final", "fix_one"]


def final(cls: C) -> C:
    """``typing.final``, enforced at run time too: subclassing raises ``TypeError``."""

    def __init_subclass__(subcls: type, /, **kwargs: object) -> None:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} does not support subclassing")

    cls.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
    import typing  # (when a public class is defined: the library's, no short command's)

    return typing.final(cls)


class NoPublicConstructor(type):
    """A metaclass for classes only the library builds: ``Cls(...)`` raises ``TypeError``.

    The library calls ``Cls._create(...)`` instead.
    """

    def __call__(cls, *args: object, **kwargs: object) -> None:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor")

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


def fix_one(module_name: str, name: str, obj: object) -> None:
    """Set ``__module__`` of one public class or function (and its methods' qualnames stay)."""
    mod = getattr(obj, "__module__", None)
    if mod is not None and mod.startswith("trio_worker."):
        with contextlib.suppress(AttributeError, TypeError):
            obj.__module__ = module_name
