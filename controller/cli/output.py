"""How the CLI prints: JSON for --json, aligned tables and ages for people."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from google.protobuf.json_format import MessageToDict

from edgefleet.common.units import format_duration, parse_duration


def to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def ago(unix_ms: int) -> str:
    if not unix_ms:
        return "never"
    return format_duration(max(0.0, time.time() - unix_ms / 1000)) + " ago"


def ratio_phrase(ratio: float, more: str, less: str, same: str) -> str:
    """'1.62x faster' for 1.62, '1.12x slower' for 0.89: a ratio under 1 never reads '0.89x faster',
    and one that rounds to 1.00 reads ``same`` ('as fast'), not '1.00x faster'."""
    if f"{ratio:.2f}" == "1.00" or f"{1 / max(ratio, 1e-9):.2f}" == "1.00":
        return same
    return f"{ratio:.2f}x {more}" if ratio >= 1 else f"{1 / max(ratio, 1e-9):.2f}x {less}"


def speed_and_size(speedup: float, size_ratio: float) -> str:
    speed = ratio_phrase(speedup, "faster", "slower", "as fast")
    return f"{speed}, {ratio_phrase(size_ratio, 'smaller', 'bigger', 'the same size')}"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def duration_option(value: str, name: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None
