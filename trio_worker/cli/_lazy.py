"""What a short command's start-up can leave out: modules a library imports and the command
never runs (loaded on first use), and the cycle collector (until the connection is up).

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

Start-up allocates the objects of some 150 modules, and each 700 of them the cycle
collector runs, now and then over everything allocated so far: about 7 % of a ``trio-worker
list`` or ``run -- true`` (9 ms of CPU on the loaded 2-core machine), finding nothing to
free. :func:`pause_collector` turns it off for a command run as its own process (``main``);
:func:`resume_collector` turns it on again once the command is connected
(``_session.open_client``), after moving what start-up made out of its reach
(``gc.freeze``), so that a ``logs -f`` that runs for hours collects its own garbage and
never walks the modules again. Commands that are not short (``serve``, ``certs``, help)
get the collector back at once, as it was.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Iterable

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final

__all__ = ["DEFERRED", "defer", "pause_collector", "resume_collector"]

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


def pause_collector() -> None:
    """No cycle collection during start-up (see the module's docstring)."""
    gc.disable()


def resume_collector(*, freeze: bool = True) -> None:
    """Cycle collection again, if :func:`pause_collector` stopped it; with ``freeze``, what
    exists now is left out of every later collection (it lives as long as the process)."""
    if gc.isenabled():
        return  # never paused (main called in-process, as tests do): leave it alone
    if freeze:
        gc.freeze()
    gc.enable()
