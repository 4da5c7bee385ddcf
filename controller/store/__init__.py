"""Stores behind one interface: SQLite (embedded default); PostgreSQL for scale-out."""
