"""Database: the declarative base, model discovery, the Litestar plugin config and migrations."""
