"""The operator's rollout spec (controller/rollouts/plan.py): pure functions, no controller needed."""

from __future__ import annotations

import pytest

from edgefleet.controller.errors import InvalidArgument
from edgefleet.controller.rollouts.plan import Gate, WaveSize, assign_waves, parse_gate, parse_waves, selector_matches
from edgefleet.controller.store.base import DeviceRecord


def test_waves_are_a_canary_count_then_cumulative_shares() -> None:
    assert parse_waves("1, 10%,100%") == [WaveSize(count=1), WaveSize(fraction=0.1), WaveSize(fraction=1.0)]
    for bad, needle in [("1,50%", "must end at 100%"), ("0,100%", "'0' is not a device count"),
                        ("1,150%", "'150%'"), ("x,100%", "'x'"), ("", "must end at 100%")]:
        with pytest.raises(InvalidArgument, match=needle):
            parse_waves(bad)


def test_assign_waves_per_class() -> None:
    ids = [f"d{i}" for i in range(10)]
    plan = assign_waves(ids, parse_waves("1,10%,50%,100%"))
    # The canary is one device; 10% of 10 is already covered by it, so that wave is empty.
    assert [sum(1 for w in plan.values() if w == k) for k in range(4)] == [1, 0, 4, 5]
    assert plan["d0"] == 0 and plan["d9"] == 3
    assert assign_waves(["a"], parse_waves("5,100%")) == {"a": 0}


def test_gates_parse_absolute_and_relative_limits() -> None:
    assert parse_gate("p95_ms<=1.2x") == Gate("p95_ms", 1.2, True)
    assert str(parse_gate(" error_rate <= 0.01 ")) == "error_rate<=0.01"
    with pytest.raises(InvalidArgument, match="METRIC one of p50_ms"):
        parse_gate("latency<=3")
    with pytest.raises(InvalidArgument, match="is not understood"):
        parse_gate("p95_ms>=3")


def test_selectors() -> None:
    device = DeviceRecord("dev-1", "s", {"site": "lab"}, 0, hardware_class="arm64-dotprod")
    assert selector_matches("all", device)
    assert selector_matches("class=arm64-dotprod", device) and not selector_matches("class=x86_64-avx2", device)
    assert selector_matches("label site=lab", device) and not selector_matches("label site=field", device)
    assert selector_matches("devices dev-2, dev-1", device) and not selector_matches("devices dev-2", device)
    with pytest.raises(InvalidArgument, match="--to 'everything' is not understood"):
        selector_matches("everything", device)
