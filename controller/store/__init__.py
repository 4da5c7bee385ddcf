"""Stores behind one interface: SQLite (embedded default); PostgreSQL for scale-out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.controller.store.base import StoreError

if TYPE_CHECKING:
    from edgefleet.controller.store.base import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreUnavailable(StoreError):
    """The store cannot be opened (server unreachable, schema newer than this code); the message says the fix."""


def open_store(url_or_path: str | Path) -> Store:
    """A postgresql:// or postgres:// URL opens PostgresStore; anything else is a SQLite file path.

    psycopg is imported only for a Postgres URL, so the embedded default needs nothing beyond the stdlib.
    """
    target = str(url_or_path)
    if target.lower().startswith(POSTGRES_SCHEMES):
        try:
            from edgefleet.controller.store.postgres import PostgresStore
        except ImportError as exc:
            raise StoreUnavailable(
                f"a PostgreSQL store needs psycopg ({exc.name} is missing); pip install 'edgefleet[controller]'"
            ) from None
        return PostgresStore(target)
    from edgefleet.controller.store.sqlite import SQLiteStore

    return SQLiteStore(target)
