"""Drivers over the sans-I/O wire: trio's (the TLS stream, connections, the server
transport) and the blocking one the short CLI commands use.

``_wire`` is imported first: it loads purerpc's ``grpclib`` without purerpc's package (and
anyio), before a driver's own ``from purerpc.grpclib...`` imports would load all of it.
"""

from .. import _wire as _wire
