"""aimesh ingest service."""
