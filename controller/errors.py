"""Domain errors raised by the handler layer; each transport maps them to its own status codes."""

from __future__ import annotations


class FleetError(Exception):
    """Base class. The message is shown to the caller, so it must say what to do."""


class Unauthenticated(FleetError):
    pass


class PermissionDenied(FleetError):
    pass


class InvalidArgument(FleetError):
    pass


class NotFound(FleetError):
    pass


class FailedPrecondition(FleetError):
    pass
