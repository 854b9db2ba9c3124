"""Tenants: the customers, with their limits and status."""
