"""`mlip` sub-commands of mlip.train (placeholder until implemented)."""


def register(commands) -> None:
    pass
