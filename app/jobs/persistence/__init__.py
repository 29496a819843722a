"""Persistence of the job layer: the database (db, writer), its tables and migrations,
the mapping between rows and domain objects (rows), cursors, and the store's queries."""
