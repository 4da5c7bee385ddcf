"""The MQTT side both ends share: the topic scheme, broker URLs, and how a paho client is made.

Topics are edgefleet/v1/<device id>/<leaf>; see edgefleet.agent.mqtt_link for what each leaf carries.
The controller's bridge and the agent's link both build their clients with `new_client`, so TLS,
MQTT 5 and the reconnect backoff are the same on both sides.
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TOPIC_ROOT = "edgefleet/v1"
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600  # commands queue at the broker this long while a device is away


def topic(device_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{leaf}"


def split_topic(name: str) -> tuple[str, str] | None:
    """'edgefleet/v1/<id>/<leaf...>' -> (id, leaf), or None for anything else."""
    parts = name.split("/", 3)
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or not parts[2]:
        return None
    return parts[2], parts[3]


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""


def parse_broker_url(url: str) -> BrokerAddress:
    """mqtt://[user:pass@]host[:1883] or mqtts://[user:pass@]host[:8883]."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"{url!r} is not a broker URL; use mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)
    except ValueError:
        raise ValueError(f"{url!r} has a bad port; use mqtt://HOST:PORT") from None
    return BrokerAddress(
        host=parsed.hostname, port=port, tls=parsed.scheme == "mqtts",
        username=urllib.parse.unquote(parsed.username or ""), password=urllib.parse.unquote(parsed.password or ""),
    )


def tls_context(ca_pem: str = "", ca_file: Path | None = None) -> ssl.SSLContext:
    """Verify the broker against a private CA when one is given, else against the system roots."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None, cadata=ca_pem or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def new_client(
    client_id: str,
    address: BrokerAddress,
    *,
    username: str,
    password: str,
    ca_pem: str = "",
    ca_file: Path | None = None,
    backoff_max_s: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> mqtt.Client:
    """An MQTT 5 paho client with credentials, TLS when asked, and bounded reconnect backoff.

    `context`: a TLS context of the caller's, e.g. one holding a device's client certificate (a
    broker with `use_identity_as_username` takes the device id from it; no password is sent)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password or None)
    if address.tls:
        client.tls_set_context(context or tls_context(ca_pem, ca_file))
    client.reconnect_delay_set(min_delay=1, max_delay=max(1, int(backoff_max_s)))
    return client


def session_properties(expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = expiry_s
    return properties


def connack_refused(reason_code: Any) -> str | None:
    """A one-line explanation when the broker refused the login, else None."""
    if not getattr(reason_code, "is_failure", False):
        return None
    return str(reason_code)
