"""Deployment: TorchScript model files with metadata, and their loading."""

from .model_file import ModelFileError, check_metadata, load_model, read_metadata, save_model


def deploy_model(*args, **kwargs):
    """See :func:`mlip.deploy.compile.deploy_model` (imported lazily: it needs the models)."""
    from .compile import deploy_model as _deploy_model

    return _deploy_model(*args, **kwargs)


__all__ = ["ModelFileError", "check_metadata", "deploy_model", "load_model", "read_metadata", "save_model"]
