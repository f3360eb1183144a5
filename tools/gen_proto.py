"""Regenerate ``trio_worker/_pb/`` from ``worker.proto`` and the standard protos in ``proto/``.

The generated code is committed so that installing trio-worker needs neither protoc nor
grpcio-tools; ``tests/test_proto.py`` calls :func:`generate` into a temporary directory
and compares, so a proto change without regeneration fails the tests.

Run as ``python tools/gen_proto.py`` (``nox -s proto``). Needs grpcio-tools and purerpc.

Three things protoc alone does not get right for us, fixed here after generation:

* purerpc's plugin predates proto3 ``optional`` and does not declare support for it, so
  protoc refuses to run it on our ``Job``. The plugin never looks at fields (only at
  services), so we act as protoc ourselves: protoc compiles the proto to a descriptor
  set, and we hand purerpc's unchanged plugin ``main`` the ``CodeGeneratorRequest``
  built from it.
* Both generators write top-level imports (``import worker_pb2``, and the classes'
  module ``'worker_pb2'``); the code lives in the package ``trio_worker._pb``.
* protoc stamps the gencode with its own protobuf version and the runtime refuses to
  load gencode newer than itself. The code protoc writes for this file uses nothing
  newer than protobuf 6.31 (checked by importing it under 6.31.0), so the stamp is set
  to :data:`RUNTIME_FLOOR`, the floor in ``pyproject.toml``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "worker.proto"
#: Standard gRPC services' protos under ``proto/`` (without ``.proto``), each kept at the file
#: name its grpcio package registers (see their headers), and the module generated from it
#: into the same package.
STANDARD_PROTOS = {
    "grpc_health/v1/health": "health_pb2",
    "grpc_reflection/v1/reflection": "reflection_pb2",
    "grpc_reflection/v1alpha/reflection": "reflection_v1alpha_pb2",
}
OUT_DIR = REPO / "trio_worker" / "_pb"
PACKAGE = "trio_worker._pb"

#: Oldest protobuf runtime the committed gencode declares itself compatible with.
RUNTIME_FLOOR = (6, 31, 0)

_PLUGIN_MAIN = "from purerpc.protoc_plugin.plugin import main; main()"


def generator_versions() -> str:
    """Name the tools whose output is committed; the byte-for-byte test compares this."""
    return f"grpcio-tools {metadata.version('grpcio-tools')}, purerpc {metadata.version('purerpc')}"


def _init_module() -> str:
    return (
        f'"""Code generated from worker.proto by tools/gen_proto.py; do not edit.\n\n'
        f"Regenerate with ``nox -s proto`` (``python tools/gen_proto.py``).\n"
        f'"""\n\n'
        f'GENERATOR = "{generator_versions()}"\n'
    )


def _sub_once(pattern: str, replacement: str, text: str, what: str) -> str:
    """Replace exactly one match, so a change in the generators' output fails loudly."""
    new, count = re.subn(pattern, replacement, text)
    if count != 1:
        raise RuntimeError(f"gen_proto: expected one {what} in generated code, found {count}")
    return new


def _fix_pb2(text: str) -> str:
    major, minor, patch = RUNTIME_FLOOR
    text = _sub_once(
        r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*)"
        r"\d+(,\s*)\d+(,\s*)\d+(,\s*)'[^']*'",
        rf"\g<1>{major}\g<2>{minor}\g<3>{patch}\g<4>''",
        text,
        "runtime version check",
    )
    return _sub_once(
        r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, 'worker_pb2',",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.worker_pb2',",
        text,
        "module name",
    )


def _fix_standard_pb2(text: str, source: str, name: str) -> str:
    """The same two fixes as :func:`_fix_pb2`, for a standard gRPC service's ``*_pb2.py``
    generated from ``proto/<source>.proto`` into ``trio_worker._pb.<name>``."""
    major, minor, patch = RUNTIME_FLOOR
    text = _sub_once(
        r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*)"
        r"\d+(,\s*)\d+(,\s*)\d+(,\s*)'[^']*'",
        rf"\g<1>{major}\g<2>{minor}\g<3>{patch}\g<4>''",
        text,
        "runtime version check",
    )
    source_module = re.escape(source.replace("/", ".") + "_pb2")
    return _sub_once(
        rf"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '{source_module}',",
        f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE}.{name}',",
        text,
        "module name",
    )


def _fix_grpc(text: str) -> str:
    text = _sub_once(
        r"(?m)^import worker_pb2 as worker__pb2$",
        "from . import worker_pb2 as worker__pb2",
        text,
        "worker_pb2 import",
    )
    header = (
        "# Generated from worker.proto by purerpc's protoc plugin via tools/gen_proto.py.\n"
        "# DO NOT EDIT: regenerate with `nox -s proto`.\n"
    )
    return header + text.rstrip("\n") + "\n"


def _run_purerpc_plugin(descriptor_set: bytes) -> str:
    # Imported here so that importing this module (for its constants) needs only the stdlib.
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file
    request = plugin_pb2.CodeGeneratorRequest(file_to_generate=[PROTO.name], proto_file=files)
    result = subprocess.run(
        [sys.executable, "-c", _PLUGIN_MAIN],
        input=request.SerializeToString(),
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"purerpc plugin failed:\n{result.stderr.decode(errors='replace')}")
    response = plugin_pb2.CodeGeneratorResponse.FromString(result.stdout)
    if response.error:
        raise RuntimeError(f"purerpc plugin failed: {response.error}")
    (generated,) = [f for f in response.file if f.name == "worker_grpc.py"]
    return str(generated.content)


def generate(out_dir: Path) -> None:
    """Write ``__init__.py``, ``worker_pb2.py``, ``worker_pb2.pyi`` and ``worker_grpc.py``,
    and a ``.py``/``.pyi`` pair for each of :data:`STANDARD_PROTOS`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        descriptor_set = tmp / "worker.binpb"
        # `python -m grpc_tools.protoc` adds the include path of google/protobuf/*.proto.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={PROTO.parent}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--descriptor_set_out={descriptor_set}",
                "--include_imports",
                PROTO.name,
            ],
            check=True,
            cwd=PROTO.parent,
        )
        # The standard services keep grpcio's file names, so both load into one pool.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={REPO / 'proto'}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                *(f"{source}.proto" for source in STANDARD_PROTOS),
            ],
            check=True,
            cwd=REPO,
        )
        outputs = {
            "__init__.py": _init_module(),
            "worker_pb2.py": _fix_pb2((tmp / "worker_pb2.py").read_text(encoding="utf-8")),
            "worker_pb2.pyi": (tmp / "worker_pb2.pyi").read_text(encoding="utf-8"),
            "worker_grpc.py": _fix_grpc(_run_purerpc_plugin(descriptor_set.read_bytes())),
        }
        for source, name in STANDARD_PROTOS.items():
            generated = tmp / f"{source}_pb2"
            outputs[f"{name}.py"] = _fix_standard_pb2(
                generated.with_suffix(".py").read_text(encoding="utf-8"), source, name
            )
            outputs[f"{name}.pyi"] = generated.with_suffix(".pyi").read_text(encoding="utf-8")
    for name, text in outputs.items():
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")


def main() -> None:
    """Regenerate the committed code in place."""
    generate(OUT_DIR)
    print(f"wrote {OUT_DIR.relative_to(REPO)}/ ({generator_versions()})")


if __name__ == "__main__":
    main()
