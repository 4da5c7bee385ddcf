"""What the audit log keeps of a Control request: its arguments, with every secret taken out.

The scrub works on the message descriptor, not per method, so a new RPC is scrubbed without anyone
remembering to: bytes fields (uploads, inputs_npz) become their size, fields named like secrets
become "<redacted>", and any string that looks like an EdgeFleet credential (efo_/efe_/efd_...) is
redacted wherever it appears, labels and free text included. Responses are never recorded: that
is where new token secrets travel.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

REDACTED = "<redacted>"
SECRET_FIELD_NAMES = frozenset({"token", "secret", "password", "device_secret", "private_key", "key_pem"})
SECRET_FIELD_SUFFIXES = ("_token", "_secret", "_password", "_private_key")
# The prefixes controller/fleet/credentials.py gives operator, enrollment and device secrets.
CREDENTIAL_RE = re.compile(r"\bef[oed]_[A-Za-z0-9_-]{6,}")
MAX_ARGUMENTS_CHARS = 4096  # one audit row stays small whatever the request carried


def is_secret_field(name: str) -> bool:
    return name in SECRET_FIELD_NAMES or name.endswith(SECRET_FIELD_SUFFIXES)


def scrub(message: Message) -> dict[str, Any]:
    """The message's set fields as JSON-ready values, without secrets or raw bytes."""
    return {field.name: _field(field, value) for field, value in message.ListFields()}


def _field(field: FieldDescriptor, value: Any) -> Any:
    secret = is_secret_field(field.name)
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        return {_text(str(k), False): _value(value_field, v, secret) for k, v in value.items()}
    if field.is_repeated:
        return [_value(field, v, secret) for v in value]
    return _value(field, value, secret)


def _value(field: FieldDescriptor, value: Any, secret: bool) -> Any:
    if isinstance(value, Message):
        return scrub(value)
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, str):
        return _text(value, secret)
    if field.enum_type is not None:
        number = field.enum_type.values_by_number.get(value)
        return number.name if number is not None else value
    if secret:
        return REDACTED
    return value


def _text(value: str, secret: bool) -> str:
    if secret and value:
        return REDACTED
    return CREDENTIAL_RE.sub(REDACTED, value)


def arguments_json(arguments: dict[str, Any]) -> str:
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    if len(text) <= MAX_ARGUMENTS_CHARS:
        return text
    return json.dumps({"truncated_from_chars": len(text), "head": text[:MAX_ARGUMENTS_CHARS]}, sort_keys=True)


class StreamArguments:
    """A client stream passed through to the handler, summarised as it goes: the first message's
    fields (an upload's sha256 and size) plus how many messages and bytes followed."""

    def __init__(self, requests: AsyncIterator[Message]) -> None:
        self._requests = requests
        self.first: dict[str, Any] = {}
        self.messages = 0
        self.bytes = 0

    def __aiter__(self) -> StreamArguments:
        return self

    async def __anext__(self) -> Message:
        message = await self._requests.__anext__()
        if self.messages == 0:
            self.first = scrub(message)
        self.messages += 1
        self.bytes += message.ByteSize()
        return message

    def summary(self) -> dict[str, Any]:
        return {**self.first, "stream": {"messages": self.messages, "bytes": self.bytes}}
