"""`mlip` sub-commands of mlip.lammps (placeholder until implemented)."""


def register(commands) -> None:
    pass
