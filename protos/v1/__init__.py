"""Generated protobuf and gRPC code for edgefleet.v1."""
