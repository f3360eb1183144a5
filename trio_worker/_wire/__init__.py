"""The wire, sans-I/O: HTTP/2 + gRPC framing, HPACK, status; no trio, no sockets.

The core stands on ``purerpc.grpclib`` (purerpc's sans-I/O layer), which is loaded here
without purerpc's package ``__init__``: that one imports purerpc's anyio client and server
(~80 ms, more than the rest of a ``trio-worker list``), none of which the wire uses. A later
``import purerpc`` still runs that ``__init__`` and finds these same modules.
"""

from __future__ import annotations

import importlib.util
import sys


def _load_grpclib() -> None:
    if "purerpc.grpclib" in sys.modules:
        return
    package = importlib.util.find_spec("purerpc")
    if package is None or not package.submodule_search_locations:
        return  # not installed: the imports that need it say so
    location = f"{package.submodule_search_locations[0]}/grpclib"
    spec = importlib.util.spec_from_file_location(
        "purerpc.grpclib", f"{location}/__init__.py", submodule_search_locations=[location]
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["purerpc.grpclib"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["purerpc.grpclib"]
        raise


_load_grpclib()
