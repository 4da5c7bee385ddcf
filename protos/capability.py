"""The capability version: one integer an agent and a controller exchange on Enroll and Session.

Each side announces the highest version it speaks; both then use ``min(ours, theirs)``.
Bump it when a message gains meaning the other side must know about, add a dated line below,
and name the version in a constant when behaviour depends on it: a peer whose negotiated
version is older is never sent what it cannot understand (see `lacks`).
"""

from __future__ import annotations

CAPABILITY_VERSION = 8

# version -> (date, what it added). Never edit a past line.
HISTORY: dict[int, tuple[str, str]] = {
    1: ("2026-11-22", "Enroll with hardware profile, Session with Hello/Heartbeat, FetchArtifact from an offset"),
    2: ("2026-11-22", "MQTT transport: per-device broker logins, retained DeviceState and Last Will, telemetry, "
                      "commands and acks on edgefleet/v1/<device>/..."),
    3: ("2026-11-22", "On-device measurement: the MeasureCandidates command, timings in CommandAck"),
    4: ("2026-11-22", "Artifact acks: bundles over MQTT in numbered chunks, requested in windows by ArtifactAck"),
    5: ("2026-12-01", "OpenVINO runtime devices in the hardware profile; OpenVINO builds and candidates "
                      "(Candidate.device, inference_precision, weights)"),
    6: ("2026-12-02", "DeviceState carries the full hardware profile on MQTT connect, as Hello does on gRPC"),
    7: ("2026-12-02", "Device certificates: Enroll with a CSR, mutual TLS on Session and FetchArtifact, "
                      "RenewCertificate (by certificate, or by the old secret to move over), the CA bundle "
                      "and a renew hint in SessionAccepted"),
    8: ("2026-12-03", "Candidate.threads: candidates timed on fewer intra-op threads than the agent serves on; "
                      "a bundle manifest's runtime names the thread count its build was chosen at"),
}

MQTT_TRANSPORT = 2
MEASURE_CANDIDATES = 3
ARTIFACT_ACKS = 4
OPENVINO_RUNTIME = 5
PROFILE_ON_MQTT = 6
DEVICE_CERTIFICATES = 7
CANDIDATE_THREADS = 8


def negotiate(peer_version: int) -> int:
    """The version both sides speak; 0 from an old peer means it predates versioning (treated as 1)."""
    return max(1, min(CAPABILITY_VERSION, peer_version or 1))


def lacks(negotiated: int, needed: int, what: str) -> str | None:
    """Why a peer at `negotiated` cannot be sent `what` (which needs version `needed`), or None if it can."""
    if negotiated >= needed:
        return None
    since, _ = HISTORY[needed]
    return (f"{what} needs capability version {needed} (added {since}) and this device speaks "
            f"{negotiated}; upgrade its agent")
