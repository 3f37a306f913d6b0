"""Sizes for people: a small dump is "12.3 KiB", never "0.0 MiB" (issue 11 §7)."""

from __future__ import annotations

from airflow_provider_pgplakar.store.sizes import human_bytes


def test_human_bytes_picks_the_unit() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(12_600) == "12.3 KiB"
    assert human_bytes(5 * 2**20) == "5.0 MiB"
    assert human_bytes(3 * 2**40 + 2**39) == "3.5 TiB"
    assert human_bytes(2**60) == "1024.0 PiB"
    assert human_bytes(-2048) == "-2.0 KiB"
    assert human_bytes(1.5 * 2**30) == "1.5 GiB"  # rates are floats
