"""gRPC server reflection: ``grpc.reflection.v1`` and ``v1alpha`` ``ServerReflection``.

grpcurl, grpc_cli, Postman and grpcio-reflection's client ask it, over one bidirectional
stream, which services the server has and for the descriptors of their proto files, so
they can call the server without its ``.proto`` files. v1 is the current protocol; v1alpha
(the same messages in another package) is what older clients, grpcio-reflection's
included, still speak. Both are served from one index.

The index is built once, from the protobuf descriptor pool, for the services named at
construction (and for reflection itself): their files and, transitively, the files those
import (``worker.proto`` imports ``google/protobuf/duration.proto`` and ``timestamp.proto``).
Only those files are served, nothing else that happens to be loaded in the process. Every
file answer carries the file and all its transitive dependencies, so a client can build
the descriptors from that one answer.

Failures are answers, as the protocol has it: an unknown file or symbol is an
``error_response`` (NOT_FOUND) in the stream, which goes on. Any authenticated client may
call it: no role is needed (the method table has no role check, as for health).

The messages come from ``trio_worker._pb.reflection_pb2`` and ``reflection_v1alpha_pb2``,
generated from ``proto/grpc_reflection/``: grpcio-reflection is only a test dependency.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from types import ModuleType
from typing import Any

import trio
from google.protobuf import descriptor_pool

from .._net._transport import BidiStreamMethod, CallContext, Method, RpcError, StatusCode
from .._pb import reflection_pb2, reflection_v1alpha_pb2

__all__ = ["SERVICE_NAME", "SERVICE_NAME_V1ALPHA", "ReflectionService"]

#: The full names of the two reflection services, as in method paths.
SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAME_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"

_VERSIONS: dict[str, ModuleType] = {
    SERVICE_NAME: reflection_pb2,
    SERVICE_NAME_V1ALPHA: reflection_v1alpha_pb2,
}


def _add_with_imports(file: Any, seen: dict[str, Any]) -> None:
    """Add ``file`` and everything it imports, transitively, to ``seen`` (by file name)."""
    if file.name in seen:
        return
    seen[file.name] = file
    for dependency in file.dependencies:
        _add_with_imports(dependency, seen)


def _closure(file: Any) -> tuple[bytes, ...]:
    """``file``'s serialized ``FileDescriptorProto`` first, then its transitive imports'."""
    files: dict[str, Any] = {}
    _add_with_imports(file, files)
    return tuple(f.serialized_pb for f in files.values())


def _message_symbols(message: Any) -> Iterator[str]:
    """Full names declared in a message: itself, fields, oneofs, nested types, enums."""
    yield message.full_name
    for field in message.fields:
        yield field.full_name
    for oneof in message.oneofs:
        yield oneof.full_name
    for extension in message.extensions:
        yield extension.full_name
    for nested in message.nested_types:
        yield from _message_symbols(nested)
    for enum in message.enum_types:
        yield from _enum_symbols(enum)


def _enum_symbols(enum: Any) -> Iterator[str]:
    """An enum's full name, and its values' (scoped like the enum, C++ rules)."""
    yield enum.full_name
    scope = enum.full_name.rpartition(".")[0]
    for value in enum.values:
        yield f"{scope}.{value.name}" if scope else value.name


def _file_symbols(file: Any) -> Iterator[str]:
    for message in file.message_types_by_name.values():
        yield from _message_symbols(message)
    for enum in file.enum_types_by_name.values():
        yield from _enum_symbols(enum)
    for extension in file.extensions_by_name.values():
        yield extension.full_name
    for service in file.services_by_name.values():
        yield service.full_name
        for method in service.methods:
            yield method.full_name


def _messages(file: Any) -> Iterator[Any]:
    """Every message type a file declares, nested ones included."""
    pending = list(file.message_types_by_name.values())
    while pending:
        message = pending.pop()
        yield message
        pending.extend(message.nested_types)


def _extensions(file: Any) -> Iterator[Any]:
    """Every extension a file declares, at top level or inside a message."""
    yield from file.extensions_by_name.values()
    for message in _messages(file):
        yield from message.extensions


class ReflectionService:
    """Answers reflection requests about ``services`` (full names) and about itself.

    ``pool`` is where their descriptors are looked up, the default pool (where generated
    code registers itself) unless given. A service missing from it is a ValueError here,
    not a surprise for the first client.
    """

    def __init__(
        self, services: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        pool = descriptor_pool.Default() if pool is None else pool
        names = sorted({*services, *_VERSIONS})
        files: dict[str, Any] = {}
        for name in names:
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                raise ValueError(f"service {name!r} is not in the descriptor pool") from None
            _add_with_imports(service.file, files)
        self._service_names: tuple[str, ...] = tuple(names)
        #: file name -> the serialized file and its transitive imports
        self._files: dict[str, tuple[bytes, ...]] = {
            name: _closure(file) for name, file in files.items()
        }
        #: fully-qualified symbol -> name of the file declaring it
        self._symbols: dict[str, str] = {}
        #: (extended message, field number) -> name of the file declaring the extension
        self._extensions: dict[tuple[str, int], str] = {}
        #: message full name -> numbers of its known extensions
        self._extension_numbers: dict[str, list[int]] = {}
        for name, file in files.items():
            for symbol in _file_symbols(file):
                self._symbols.setdefault(symbol, name)
            for message in _messages(file):
                self._extension_numbers[message.full_name] = []
            for extension in _extensions(file):
                extendee = extension.containing_type.full_name
                self._extensions[(extendee, extension.number)] = name
        for extendee, number in sorted(self._extensions):
            if extendee in self._extension_numbers:
                self._extension_numbers[extendee].append(number)
        self._shutting_down = False
        self._waiting: set[trio.CancelScope] = set()

    @property
    def service_names(self) -> tuple[str, ...]:
        """What ``list_services`` answers, sorted."""
        return self._service_names

    def methods(self) -> dict[str, Method]:
        """The method table to hand to the transport's ``Server``: v1 and v1alpha."""
        table: dict[str, Method] = {}
        for service, pb in _VERSIONS.items():

            def handler(
                requests: AsyncIterator[Any], ctx: CallContext, pb: ModuleType = pb
            ) -> AsyncIterator[Any]:
                return self._info(pb, requests, ctx)

            table[f"/{service}/ServerReflectionInfo"] = BidiStreamMethod(
                pb.ServerReflectionRequest, pb.ServerReflectionResponse, handler
            )
        return table

    def enter_graceful_shutdown(self) -> None:
        """End the streams that wait for a request (UNAVAILABLE), now and from now on, so
        that idle clients do not hold up the server's drain; answers in progress finish."""
        self._shutting_down = True
        for scope in self._waiting:
            scope.cancel()

    async def _info(
        self, pb: ModuleType, requests: AsyncIterator[Any], ctx: CallContext
    ) -> AsyncIterator[Any]:
        while True:
            with trio.CancelScope() as waiting:
                if self._shutting_down:
                    waiting.cancel()
                self._waiting.add(waiting)
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._waiting.discard(waiting)
            if waiting.cancelled_caught:
                raise RpcError(StatusCode.UNAVAILABLE, "the server is shutting down")
            yield self.answer(pb, request)

    def answer(self, pb: ModuleType, request: Any) -> Any:
        """The response to one ``ServerReflectionRequest`` of module ``pb``'s version."""
        response = pb.ServerReflectionResponse(valid_host=request.host)
        response.original_request.CopyFrom(request)
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            response.list_services_response.service.extend(
                pb.ServiceResponse(name=name) for name in self._service_names
            )
        elif kind == "file_by_filename":
            name = request.file_by_filename
            if name in self._files:
                self._fill_files(response, name)
            else:
                self._fill_error(response, StatusCode.NOT_FOUND, f"file {name!r} not found")
        elif kind == "file_containing_symbol":
            symbol = request.file_containing_symbol
            name = self._symbols.get(symbol.removeprefix("."))
            if name is not None:
                self._fill_files(response, name)
            else:
                self._fill_error(response, StatusCode.NOT_FOUND, f"symbol {symbol!r} not found")
        elif kind == "file_containing_extension":
            extendee = request.file_containing_extension.containing_type.removeprefix(".")
            number = request.file_containing_extension.extension_number
            name = self._extensions.get((extendee, number))
            if name is not None:
                self._fill_files(response, name)
            else:
                self._fill_error(
                    response, StatusCode.NOT_FOUND, f"extension {number} of {extendee!r} not found"
                )
        elif kind == "all_extension_numbers_of_type":
            extendee = request.all_extension_numbers_of_type.removeprefix(".")
            numbers = self._extension_numbers.get(extendee)
            if numbers is not None:
                result = response.all_extension_numbers_response
                result.base_type_name = extendee
                result.extension_number.extend(numbers)
            else:
                self._fill_error(response, StatusCode.NOT_FOUND, f"type {extendee!r} not found")
        else:
            self._fill_error(response, StatusCode.INVALID_ARGUMENT, "no request in the message")
        return response

    def _fill_files(self, response: Any, name: str) -> None:
        response.file_descriptor_response.file_descriptor_proto.extend(self._files[name])

    @staticmethod
    def _fill_error(response: Any, code: StatusCode, message: str) -> None:
        response.error_response.error_code = int(code)
        response.error_response.error_message = message
