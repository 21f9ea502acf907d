"""aimesh notifier service."""
