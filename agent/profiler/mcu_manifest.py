"""MCU-class devices announce themselves through a small JSON manifest.

A microcontroller cannot run the agent, so the gateway it hangs off (a Pi, an x86 box) runs the agent and
carries a manifest that says what is attached. The profiler turns each entry into an `Accelerator` with
`kind: "mcu"`; `hardware_class` then keys the device to the MCU export (int8 TFLite as a C array).

Default location: `<root>/etc/edgefleet/mcu.json` (or the path passed to `collect_profile(mcu_manifest=)`).
Format, version 1::

    {
      "schema_version": 1,
      "devices": [
        {
          "name": "door-sensor",          # required: how the operator calls it
          "core": "Cortex-M7",            # required: CPU core (Cortex-M0+/M4/M7/M33/M55/M85, esp32-s3, ...)
          "vendor": "st",                 # chip vendor
          "model": "STM32H747",           # chip
          "flash_bytes": 2097152,         # program flash for the model + code
          "ram_bytes": 1048576,           # SRAM for the tensor arena
          "npu": "Ethos-U55",             # optional micro-NPU
          "runtime": "tflite-micro",      # runtime on the MCU
          "transport": "usb-cdc",         # how the gateway reaches it: usb-cdc, uart, ble, spi
          "port": "/dev/ttyACM0"          # where
        }
      ]
    }
"""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.protos.v1 import profile_pb2

from .tree import ProfiledTree

DEFAULT_MANIFEST = "/etc/edgefleet/mcu.json"
SCHEMA_VERSION = 1
_FIX = "fix it to match the format documented in edgefleet.agent.profiler.mcu_manifest"


def read_mcu_manifest(tree: ProfiledTree, manifest: Path | None = None) -> list[profile_pb2.Accelerator]:
    """Accelerators for the MCUs a manifest lists; no manifest means no MCU, which is not a gap."""
    path = manifest if manifest is not None else tree.path(DEFAULT_MANIFEST)
    text = tree.read_text(path, what="MCU manifest") if (manifest is not None or path.exists()) else None
    if text is None:
        return []
    shown = str(manifest) if manifest is not None else DEFAULT_MANIFEST
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        tree.gap("MCU manifest", f"{shown} is not valid JSON ({exc.msg} at line {exc.lineno}); {_FIX}")
        return []
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        tree.gap("MCU manifest", f'{shown} needs "schema_version": {SCHEMA_VERSION}; {_FIX}')
        return []
    found: list[profile_pb2.Accelerator] = []
    for position, entry in enumerate(document.get("devices") or []):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("core"):
            tree.gap("MCU manifest", f'{shown} devices[{position}] needs "name" and "core"; {_FIX}')
            continue
        details = {
            key: str(entry[key])
            for key in ("name", "core", "npu", "runtime", "transport", "flash_bytes", "ram_bytes")
            if entry.get(key) not in (None, "")
        }
        try:
            ram = int(entry.get("ram_bytes") or 0)
        except (TypeError, ValueError):
            ram = 0
            tree.gap("MCU manifest", f"{shown} devices[{position}].ram_bytes is not an integer; {_FIX}")
        found.append(
            profile_pb2.Accelerator(
                kind="mcu",
                vendor=str(entry.get("vendor", "")),
                model=str(entry.get("model", "")),
                driver=str(entry.get("runtime", "")),
                memory_bytes=ram,
                device_path=str(entry.get("port", "")),
                source=shown,
                details=details,
            )
        )
    return found
