"""Bridges to other simulation engines (optional dependencies, imported on use)."""
