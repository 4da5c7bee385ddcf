"""Parsing of the human-friendly values the CLIs take: durations, sizes and label lists.

Both the operator CLI and the agent use these, so they live in the light agent package.
"""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,61}[A-Za-z0-9])?$")


def parse_duration(text: str) -> float:
    """'90s', '10m', '24h', '500ms' or a bare number of seconds -> seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a number with ms, s, m, h or d, e.g. 30s or 24h")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_labels(text: str) -> dict[str, str]:
    """'site=berlin,line=3' -> {'site': 'berlin', 'line': '3'}; keys are checked like Kubernetes labels."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ValueError(f"label {part!r} has no '='; write labels as key=value,key2=value2")
        check_label(key, value)
        labels[key] = value
    return labels


def check_label(key: str, value: str) -> None:
    if not _LABEL_KEY_RE.match(key):
        raise ValueError(
            f"label key {key!r} is invalid; use 1-63 letters, digits, '-', '_', '.', '/', "
            "starting and ending with a letter or digit"
        )
    if len(value) > 255 or any(c in value for c in ",\n\r\0"):
        raise ValueError(f"label value for {key!r} is invalid; use at most 255 characters, no commas or newlines")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
