"""Enrollment: operators mint bounded, expiring tokens; devices trade one for an identity.

Transport-agnostic: the gRPC servicers (and later MQTT) only convert messages and call these.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgefleet.controller.errors import InvalidArgument, NotFound, Unauthenticated
from edgefleet.controller.fleet import credentials as auth
from edgefleet.controller.fleet import validation
from edgefleet.controller.store.base import DeviceRecord, EnrollmentRefused, EnrollmentTokenRecord, Store
from edgefleet.protos.capability import negotiate
from edgefleet.protos.v1 import profile_pb2

if TYPE_CHECKING:  # issue 7: MQTT logins
    from edgefleet.controller.fleet.broker_auth import BrokerAuth, MqttLogin

log = logging.getLogger("edgefleet.controller.fleet.enrollment")

DEFAULT_TOKEN_TTL_S = 24 * 3600
MAX_TOKEN_USES = 100_000
MAX_TOKEN_TTL_S = 365 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class EnrolledDevice:
    record: DeviceRecord
    secret: str
    capability_version: int
    mqtt: MqttLogin | None = None  # this device's own broker login, when the controller runs with MQTT


class Enrollment:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time,
                 mqtt_logins: BrokerAuth | None = None) -> None:
        self.mqtt_logins = mqtt_logins  # issue 7: issues each enrolled device its broker login
        self.store = store
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def create_token(self, uses: int, ttl_s: float, labels: dict[str, str]) -> tuple[str, EnrollmentTokenRecord]:
        uses = uses or 1
        ttl_s = ttl_s or DEFAULT_TOKEN_TTL_S
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise InvalidArgument(f"field 'uses' must be between 1 and {MAX_TOKEN_USES}, got {uses}")
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise InvalidArgument(f"field 'ttl_s' must be between 1 s and 365 days, got {ttl_s:g} s")
        validation.check_labels("labels", labels)
        secret = auth.new_enrollment_token()
        now = self._now_ms()
        record = EnrollmentTokenRecord(
            token_id=auth.new_token_id(),
            secret_hash=auth.digest(secret),
            uses_total=uses,
            uses_left=uses,
            created_at_ms=now,
            expires_at_ms=now + int(ttl_s * 1000),
            labels=dict(labels),
        )
        self.store.create_enrollment_token(record)
        log.info("enrollment token created", extra={"token": record.token_id, "uses": uses, "ttl_s": ttl_s})
        return secret, record

    def revoke_token(self, token_id: str) -> EnrollmentTokenRecord:
        record = self.store.revoke_enrollment_token(token_id)
        if record is None:
            raise NotFound(f"no enrollment token {token_id!r}; see `edgefleet token list`")
        return record

    def enroll(
        self,
        token: str,
        *,
        capability_version: int,
        agent_version: str,
        profile: profile_pb2.HardwareProfile,
        labels: dict[str, str],
    ) -> EnrolledDevice:
        if not token:
            raise Unauthenticated("no enrollment token given; create one with `edgefleet token create`")
        validation.check_labels("labels", labels)
        validation.check_string("agent_version", agent_version, 64)
        profile_bytes = profile.SerializeToString()
        validation.check_bytes("profile", len(profile_bytes), validation.MAX_PROFILE_BYTES)
        validation.check_string("profile.hardware_class", profile.hardware_class, 64)
        secret = auth.new_device_secret()
        version = negotiate(capability_version)
        device = DeviceRecord(
            device_id=auth.new_device_id(),
            secret_hash=auth.digest(secret),
            labels=dict(labels),
            enrolled_at_ms=0,
            hostname=profile.os.hostname[:255],
            agent_version=agent_version,
            capability_version=version,
            hardware_class=profile.hardware_class,
            profile=profile_bytes,
        )
        try:
            record = self.store.enroll_device(auth.digest(token), self._now_ms(), device)
        except EnrollmentRefused as exc:
            log.warning("enrollment refused", extra={"reason": str(exc)})
            raise Unauthenticated(f"{exc}; ask an operator for a new token (`edgefleet token create`)") from None
        log.info(
            "device enrolled",
            extra={"device": record.device_id, "token": record.token_id, "class": record.hardware_class},
        )
        login = self.mqtt_logins.issue(record.device_id) if self.mqtt_logins is not None else None  # issue 7
        return EnrolledDevice(record=record, secret=secret, capability_version=version, mqtt=login)

    def authenticate_device(self, device_id: str, secret: str) -> DeviceRecord:
        """Check a device's id/secret pair; the same answer for a wrong id and a wrong secret."""
        record = self.store.get_device(device_id) if device_id else None
        if record is None or not secret or not auth.same_digest(secret, record.secret_hash):
            raise Unauthenticated(
                "device id/secret pair not recognised; re-enroll the device with a new token "
                "(remove identity.json from the agent's state dir)"
            )
        if record.revoked:
            from edgefleet.controller.fleet.device_identity import revoked_refusal

            raise revoked_refusal(record)
        return record
