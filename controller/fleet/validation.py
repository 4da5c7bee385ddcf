"""Limits on what clients may send. Each check names the offending field and the limit.

The gRPC transport also caps whole messages (see server.MAX_MESSAGE_BYTES); these checks sit
below that cap so a caller learns which field to shrink instead of a bare size error.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefleet.common.units import check_label
from edgefleet.controller.errors import InvalidArgument

MAX_LABELS = 64
MAX_PROFILE_BYTES = 256 * 1024
MAX_SHORT_STRING = 255


def check_labels(field: str, labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"field '{field}' has {len(labels)} entries; at most {MAX_LABELS} are allowed")
    for key, value in labels.items():
        try:
            check_label(key, value)
        except ValueError as exc:
            raise InvalidArgument(f"field '{field}': {exc}") from None


def check_string(field: str, value: str, limit: int = MAX_SHORT_STRING) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"field '{field}' is {len(value)} characters long; at most {limit} are allowed")


def check_bytes(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidArgument(f"field '{field}' is {size} bytes; at most {limit} are allowed")
