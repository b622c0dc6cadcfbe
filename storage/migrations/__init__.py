"""Alembic migrations of the saga tables, shipped inside the package and run by `storage.migrate`."""
