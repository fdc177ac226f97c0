"""Who may reach the API: the key (flag, file or environment), under the engine's one network rule
(localrun.netpolicy): listening beyond this machine without credentials is refused."""

from __future__ import annotations

from localrun.errors import UserError
from localrun.netpolicy import credential_text, require_auth

ENV_KEY = "LOCALRUN_API_KEY"


def api_key(*, key: str | None, key_file: str | None) -> str | None:
    """--api-key, else the first line of --api-key-file, else $LOCALRUN_API_KEY, else None."""
    text = credential_text(
        inline=key, file=key_file, env_var=ENV_KEY, inline_flag="--api-key", file_flag="--api-key-file"
    )
    if text is not None and not text.strip():
        raise UserError("The API key is empty: put a key in the file, the flag or $LOCALRUN_API_KEY.")
    return text.strip() if text is not None else None


def check_exposure(host: str, key: str | None, *, share: bool = False) -> None:
    """Refuse to serve the API beyond loopback (or on a share link) without a key."""
    require_auth(host, share=share, credentials=key, flag=f"--api-key-file (or ${ENV_KEY})")
