"""User-facing errors: one clear sentence, no traceback."""

import re
from pathlib import Path

_ABS_PATH = re.compile(r"(?:/[^\s'\"/:()]+)+")


class UserError(Exception):
    """A mistake the user can fix (bad path, not a GGUF, unknown name, ...).

    The message is one sentence that says what is wrong and what to do. The CLI prints it
    and exits with status 2; the UI shows it. Never wrap internal bugs in this class.
    """

    exit_code = 2


def without_paths(message: str) -> str:
    """A message for a client (API, browser): a file or folder of this machine named by its name alone
    (an absolute path whose top folder exists here; /v1/models and other URL paths stay)."""

    def name(match: re.Match) -> str:
        path = Path(match.group())
        return path.name if len(path.parts) > 2 and Path(*path.parts[:2]).is_dir() else match.group()

    return _ABS_PATH.sub(name, message)
