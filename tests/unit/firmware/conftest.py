"""Fixtures for the firmware unit tests; the helpers live in :mod:`bundle_fixtures`."""

from bundle_fixtures import make_bundle, other_key, signing_key

__all__ = ["make_bundle", "other_key", "signing_key"]
