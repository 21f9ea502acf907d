"""aimesh worker service."""
