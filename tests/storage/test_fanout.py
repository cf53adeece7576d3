"""Topic filters on the fields of a JSON payload, compared as JSON compares values: ``true``
is not ``1``; and ``present: false`` matches only payloads without the field."""

from __future__ import annotations

from adapters.storage.fanout import FieldCondition, Filter


def test_json_true_and_1_are_different_values() -> None:
    vip = Filter((FieldCondition("vip", (True,)),))
    assert vip.matches({"vip": True})
    assert not vip.matches({"vip": 1})
    one = Filter((FieldCondition("n", (1,)),))
    assert one.matches({"n": 1}) and one.matches({"n": 1.0})
    assert not one.matches({"n": True})


def test_present_false_matches_only_jobs_without_the_field() -> None:
    no_vip = Filter((FieldCondition("vip", present=False),))
    assert no_vip.matches({"country": "fr"})
    assert not no_vip.matches({"vip": True})
    assert not no_vip.matches({"vip": None})
