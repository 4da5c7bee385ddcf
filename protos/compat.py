"""Wire compatibility: a field number, once used, keeps its name and type or is `reserved`.

protos/field_numbers.json records every (message, number) ever published. `make protos`
adds new entries; tests fail when an entry changed meaning or vanished without `reserved`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor

LOCK_PATH = Path(__file__).resolve().parent / "field_numbers.json"
MODULES = ("profile_pb2", "fleet_pb2", "control_pb2", "local_pb2", "mqtt_pb2")


def _messages(fd: FileDescriptor) -> list[Descriptor]:
    out: list[Descriptor] = []
    stack = list(fd.message_types_by_name.values())
    while stack:
        message = stack.pop()
        out.append(message)
        stack.extend(message.nested_types)
    return out


def current_fields() -> dict[str, dict[str, str]]:
    fields: dict[str, dict[str, str]] = {}
    for name in MODULES:
        module = importlib.import_module(f"edgefleet.protos.v1.{name}")
        for message in _messages(module.DESCRIPTOR):
            if message.GetOptions().map_entry:
                continue
            fields[message.full_name] = {
                str(f.number): f"{f.name}:{f.type}:{'repeated' if f.is_repeated else 'single'}"
                for f in message.fields
            }
    return fields


def _reserved(full_name: str) -> set[int]:
    for name in MODULES:
        module = importlib.import_module(f"edgefleet.protos.v1.{name}")
        for message in _messages(module.DESCRIPTOR):
            if message.full_name == full_name:
                proto = descriptor_pb2.DescriptorProto()
                message.CopyToProto(proto)
                return {n for r in proto.reserved_range for n in range(r.start, r.end)}
    return set()


def problems(lock: dict[str, dict[str, str]] | None = None) -> list[str]:
    lock = json.loads(LOCK_PATH.read_text()) if lock is None else lock
    now = current_fields()
    found = []
    for message, numbers in sorted(lock.items()):
        for number, meaning in sorted(numbers.items(), key=lambda kv: int(kv[0])):
            current = now.get(message, {}).get(number)
            if current is None and int(number) not in _reserved(message):
                found.append(f"{message} field {number} ({meaning}) was removed without `reserved {number};`")
            elif current is not None and current != meaning:
                found.append(f"{message} field {number} was {meaning}, now {current}; use a new number")
    return found


def updated_lock() -> dict[str, dict[str, str]]:
    lock: dict[str, dict[str, str]] = json.loads(LOCK_PATH.read_text()) if LOCK_PATH.exists() else {}
    for message, numbers in current_fields().items():
        lock.setdefault(message, {}).update(
            {n: m for n, m in numbers.items() if n not in lock.get(message, {})}
        )
    return lock


def render(lock: dict[str, dict[str, str]]) -> str:
    ordered = {m: dict(sorted(f.items(), key=lambda kv: int(kv[0]))) for m, f in sorted(lock.items())}
    return json.dumps(ordered, indent=2) + "\n"
