"""The public API is small, typed and closed (after trio's ``_tests/test_exports.py``)."""

from __future__ import annotations

import inspect
import typing

import pytest

import trio_worker
from trio_worker import Isolation, JobInfo, LimitPolicy, Limits, OutputChunk, Retention, Usage


def test_every_public_name_is_exported_and_says_trio_worker() -> None:
    assert sorted(trio_worker.__all__) == sorted(set(trio_worker.__all__))
    for name in trio_worker.__all__:
        obj = getattr(trio_worker, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "trio_worker", name
    assert set(trio_worker.__all__) <= set(dir(trio_worker))


@pytest.mark.parametrize(
    "cls", [Isolation, JobInfo, LimitPolicy, Limits, OutputChunk, Retention, Usage, "Supervisor"]
)
def test_value_types_and_supervisor_cannot_be_subclassed(cls: type | str) -> None:
    target = getattr(trio_worker, cls) if isinstance(cls, str) else cls
    with pytest.raises(TypeError, match="does not support subclassing"):
        type("Sub", (target,), {})


def test_supervisor_has_no_public_constructor() -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        trio_worker.Supervisor()


def test_no_private_type_in_a_public_signature() -> None:
    def private_names(annotation: object) -> list[str]:
        text = annotation if isinstance(annotation, str) else repr(annotation)
        words = text.replace("[", " ").replace("]", " ").replace("|", " ").replace(",", " ")
        return [w for w in words.split() if any(part.startswith("_") for part in w.split("."))]

    checked = 0
    for name in trio_worker.__all__:
        obj = getattr(trio_worker, name)
        members = [obj] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            members += [
                m for n, m in vars(obj).items() if not n.startswith("_") and inspect.isfunction(m)
            ]
        for member in members:
            hints = typing.get_type_hints(inspect.unwrap(member))
            for annotation in hints.values():
                assert private_names(annotation) == [], (name, member.__name__, annotation)
            checked += 1
    assert checked > 10


def test_errors_say_trio_worker_even_when_imported_from_their_module() -> None:
    """The CLI's ``--debug`` traceback names ``trio_worker.JobNotFound``, though it never
    touches the package's (lazy) public names."""
    import subprocess
    import sys

    code = (
        "from trio_worker._errors import JobNotFound, __all__ as names\n"
        "import trio_worker._errors as e\n"
        "print(sorted({getattr(e, n).__module__ for n in names}))\n"
        "try:\n    raise JobNotFound('x')\n"
        "except JobNotFound:\n    import traceback; traceback.print_exc()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['trio_worker']"
    assert "trio_worker.JobNotFound: no job with id 'x'" in out.stderr


@pytest.mark.parametrize("name", ["WorkerClient", "OutputIterator", "Attachment"])
def test_client_objects_come_from_connect_only_and_cannot_be_subclassed(name: str) -> None:
    import trio_worker.client

    cls = getattr(trio_worker.client, name)
    with pytest.raises(TypeError, match="no public constructor"):
        cls()
    with pytest.raises(TypeError, match="does not support subclassing"):
        type("Sub", (cls,), {})
