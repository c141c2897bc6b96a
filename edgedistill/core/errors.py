"""The one exception type that means "the user can fix this": the CLI prints it as one line, exit 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, file, data, machine) with a message that names the fix.

    The message must fit on one line; the CLI prints ``error: <message>`` and exits with status 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
