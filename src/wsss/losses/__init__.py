"""Functional losses, one concern per file."""
