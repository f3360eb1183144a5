"""Code generated from worker.proto by tools/gen_proto.py; do not edit.

Regenerate with ``nox -s proto`` (``python tools/gen_proto.py``).
"""

GENERATOR = "grpcio-tools 1.85.1, purerpc 0.8.0"
