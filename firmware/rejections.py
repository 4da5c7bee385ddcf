"""Why a bundle or an install command was refused: one reason code the controller can act on.

The codes are part of the wire contract (the agent reports them in its install ack), so never
rename one; add new codes instead.
"""

from __future__ import annotations

from enum import Enum


class RejectReason(str, Enum):
    """Stable, machine-readable reasons for refusing a bundle, a command or an install."""

    # Signature and trust.
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    UNTRUSTED_KEY = "untrusted_key"
    # Integrity of the bytes.
    CORRUPT = "corrupt"
    TRUNCATED = "truncated"
    MANIFEST_MISMATCH = "manifest_mismatch"
    UNSUPPORTED_FORMAT = "unsupported_format"
    # Policy.
    WRONG_CLASS = "wrong_class"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    DOWNGRADE = "downgrade"
    MARKED_BAD = "marked_bad"
    # Install commands.
    REPLAYED = "replayed"
    COMMAND_EXPIRED = "command_expired"
    # The device.
    INSUFFICIENT_SPACE = "insufficient_space"
    SOURCE_FAILED = "source_failed"
    BUSY = "busy"
    # The model itself.
    LOAD_FAILED = "load_failed"
    SELF_TEST_FAILED = "self_test_failed"
    PROBATION_FAILED = "probation_failed"
    CRASH_LOOP = "crash_loop"
    SUPERSEDED = "superseded"


class BundleRejected(Exception):
    """A bundle, command or install refused for ``reason``; ``message`` says what to do about it."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
