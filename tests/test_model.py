from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_worker import InvalidRequest, Limits
from trio_worker._model import JobIdGenerator, _decode_id, _encode_id


def test_ids_are_unique_sortable_and_26_chars() -> None:
    gen = JobIdGenerator()
    ids = [gen() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 and i.isalnum() for i in ids)


def test_ids_sort_across_generators_by_time() -> None:
    # A restart makes a new generator: later ids must still sort later.
    first = JobIdGenerator()()
    time.sleep(0.002)
    assert JobIdGenerator()() > first


def _decode(job_id: str) -> int:
    value = 0
    for ch in job_id:
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    return value


def test_ids_are_not_guessable() -> None:
    gen = JobIdGenerator()
    ids = [_decode(gen()) for _ in range(200)]
    steps = {b - a for a, b in itertools.pairwise(ids)}
    # Consecutive ids never differ by a predictable step, even within one ms.
    assert 1 not in steps
    assert len(steps) > 190
    # The leading 48 bits are the creation time in ms.
    assert abs((ids[0] >> 80) - time.time() * 1000) < 10_000


def test_ids_made_together_differ_early_enough_for_a_short_prefix() -> None:
    """A batch made in one millisecond (places made ahead of need) shares the time part
    (10 characters); the random part must then differ at once, not 8 characters later."""
    gen = JobIdGenerator()
    ids = [gen() for _ in range(1000)]
    shared = sorted(
        next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        for a, b in itertools.pairwise(ids)
    )
    assert shared[len(shared) // 2] <= 12, shared[len(shared) // 2]  # was 18


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (Limits(cpus=-1), "limits.cpus"),
        (Limits(cpus=float("nan")), "limits.cpus"),
        (Limits(memory_bytes=-5), "limits.memory_bytes"),
        (Limits(pids=-1), "limits.pids"),
    ],
)
def test_limits_validation_names_the_field(limits: Limits, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        limits.validate()
    assert info.value.field == field


def test_an_id_before_a_bound_sorts_between_the_last_one_and_the_bound() -> None:
    gen = JobIdGenerator()
    last, bound = gen(), gen()
    for _ in range(200):
        between = gen.before(last, bound)
        assert between is not None
        assert last < between < bound
        assert len(between) == 26
        last = between
    # With nothing handed out yet: the bound's own millisecond, below the bound.
    first = gen.before(None, bound)
    assert first is not None
    assert first[:10] == bound[:10]
    assert first < bound
    # No room between two neighbours.
    assert gen.before(bound, bound) is None


@given(st.integers(min_value=0, max_value=(1 << 130) - 1))
def test_an_id_is_its_value_in_crockford_base32(value: int) -> None:
    # 26 characters, 5 bits each, most significant first: decoding gives the value back.
    text = _encode_id(value)
    assert len(text) == 26
    digits = "".join(format("0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(c), "05b") for c in text)
    assert int(digits, 2) == value
    assert _decode_id(text) == value
