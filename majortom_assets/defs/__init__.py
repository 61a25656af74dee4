"""Dagster layer: assets, resources, checks and automation, auto-loaded by definitions.py."""
