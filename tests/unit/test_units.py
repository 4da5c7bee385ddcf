from __future__ import annotations

import pytest

from edgefleet.common.units import format_duration, parse_duration, parse_labels


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("10m", 600), ("24h", 86400), ("500ms", 0.5),
                                          ("2", 2), ("1.5h", 5400), ("7d", 604800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "forever", "10x", "-5s", "s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_labels() -> None:
    assert parse_labels("site=berlin, line=3,") == {"site": "berlin", "line": "3"}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="no '='"):
        parse_labels("site")
    with pytest.raises(ValueError, match="label key"):
        parse_labels("-bad=1")


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.2, 5, 600, 7200, 3 * 86400)] == ["200ms", "5.0s", "10m", "2h", "3d"]
