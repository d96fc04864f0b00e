"""`mlip` sub-commands of mlip.deploy (placeholder until implemented)."""


def register(commands) -> None:
    pass
