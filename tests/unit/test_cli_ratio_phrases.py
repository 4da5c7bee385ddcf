"""How the CLI words a speedup or a size ratio: never '0.89x faster', never '1.00x smaller'."""

from __future__ import annotations

import pytest

from edgefleet.controller.cli.output import ratio_phrase, speed_and_size


@pytest.mark.parametrize(
    ("ratio", "phrase"),
    [(1.62, "1.62x smaller"), (0.89, "1.12x bigger"), (1.0, "the same size"), (1.004, "the same size"),
     (0.996, "the same size"), (1.006, "1.01x smaller")],
)
def test_size_ratio_phrases(ratio: float, phrase: str) -> None:
    assert ratio_phrase(ratio, "smaller", "bigger", "the same size") == phrase


def test_speed_and_size_reads_as_one_line() -> None:
    assert speed_and_size(1.0, 3.2) == "as fast, 3.20x smaller"
    assert speed_and_size(0.855, 1.0) == "1.17x slower, the same size"
