"""Deployment: TorchScript model files with metadata, and their loading."""

from .model_file import ModelFileError, check_metadata, load_model, read_metadata, save_model

__all__ = ["ModelFileError", "check_metadata", "load_model", "read_metadata", "save_model"]
