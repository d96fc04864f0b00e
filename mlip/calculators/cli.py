"""`mlip` sub-commands of mlip.calculators (placeholder until implemented)."""


def register(commands) -> None:
    pass
