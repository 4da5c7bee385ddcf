"""The EdgeFleet wire protocol: protobuf messages, gRPC services and the capability version.

Generated code lives in ``edgefleet.protos.v1``; regenerate it with ``make protos``.
"""
