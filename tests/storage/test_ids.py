"""Job ids: 26 symbols of Crockford base32 over a ms timestamp and 80 random bits."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from adapters.storage import jobs
from adapters.storage.jobs import new_job_id

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference(ms: int, bits: int) -> str:
    """The id written out plainly: 128 bits as 26 base32 symbols, most significant first."""
    value = (ms << 80) | bits
    return "".join(ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


@given(st.integers(0, 2**42), st.integers(0, 2**32 - 1))  # ms to the year 2109
def test_ids_are_the_timestamp_and_the_random_bits(ms: int, seed: int) -> None:
    jobs._random.seed(seed)
    bits = random.Random(seed).getrandbits(80)
    assert new_job_id(ms / 1000 + 0.0001) == reference(ms, bits)
    assert new_job_id(ms / 1000 + 0.0001)[:10] == reference(ms, 0)[:10]  # the cached prefix


def test_ids_sort_by_time_and_differ_within_a_millisecond() -> None:
    ids = [new_job_id(1_700_000_000 + n / 1000) for n in range(0, 3000, 7)]
    assert ids == sorted(ids)
    same_ms = {new_job_id(1_700_000_000.5) for _ in range(1000)}
    assert len(same_ms) == 1000
