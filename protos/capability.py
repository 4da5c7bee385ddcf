"""The capability version: one integer an agent and a controller exchange on Enroll and Session.

Each side announces the highest version it speaks; both then use ``min(ours, theirs)``.
Bump it when a message gains meaning the other side must know about, and add a dated line below.
"""

from __future__ import annotations

CAPABILITY_VERSION = 1

# version -> (date, what it added). Never edit a past line.
HISTORY: dict[int, tuple[str, str]] = {
    1: ("2026-11-22", "Enroll with hardware profile, Session with Hello/Heartbeat, FetchArtifact from an offset"),
}


def negotiate(peer_version: int) -> int:
    """The version both sides speak; 0 from an old peer means it predates versioning (treated as 1)."""
    return max(1, min(CAPABILITY_VERSION, peer_version or 1))
