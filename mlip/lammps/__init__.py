"""LAMMPS integration: the `pair_style mlip` plugin build and LAMMPS' plugin auto-loading hook."""
