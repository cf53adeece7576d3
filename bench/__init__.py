"""Benchmarks, each measured against a raw baseline in the same run (README, Development)."""


def shares(total: int, parts: int) -> list[int]:
    """``total`` jobs split among ``parts`` workers, adding up to it exactly: a rate is
    computed over ``total``, so a remainder left out would count jobs nobody moved."""
    return [total // parts + (i < total % parts) for i in range(parts)]
