"""User-facing errors: one clear sentence, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, not a GGUF, unknown name, ...).

    The message is one sentence that says what is wrong and what to do. The CLI prints it
    and exits with status 2; the UI shows it. Never wrap internal bugs in this class.
    """

    exit_code = 2
