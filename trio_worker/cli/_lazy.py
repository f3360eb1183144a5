"""What a short command would import only because a library imports it: loaded on first use.

protobuf's ``descriptor_pool`` imports the pure-Python message implementation
(``internal.python_message``, which imports ``text_format``, the decoder, the containers and
pickle) whatever the backend, and so does ``internal.builder``, which the generated modules
call; with upb, the backend of protobuf's wheels, neither touches it beyond the name (only
a pure-Python ``DescriptorPool`` calls into it). That import was about a seventh of a whole
``trio-worker list`` (10-15 ms on the loaded 2-core machine).

:func:`defer` puts such a module in ``sys.modules`` as :class:`importlib.util.LazyLoader`
makes it, and binds it in its package as the import system would: the first attribute looked
up on it runs it, so a use not foreseen here costs that time, and is never wrong. Only the
short client commands defer (``cli.main``); ``tests/test_cli_imports.py`` checks that they
never run these modules and that a deferred one works when used.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from typing import Final

__all__ = ["DEFERRED", "defer"]

#: Imported by ``from package import module`` only (a plain ``import module`` would look up
#: its ``__spec__`` and so run it at once), and used by no upb code path.
DEFERRED: Final = ("google.protobuf.internal.python_message",)


def defer(names: Iterable[str] = DEFERRED) -> None:
    """Make each module of ``names`` not yet imported run when it is first used."""
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # (imports the packages above it)
        except ImportError:
            continue
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        package, _, child = name.rpartition(".")
        if package:
            setattr(sys.modules[package], child, module)
