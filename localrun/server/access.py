"""Who may reach the API: the key (flag, file or environment) and the rule for non-loopback hosts.

The rule matches the UI's: listening beyond this machine without credentials is refused. When the
engine's shared network policy lands, check_exposure() becomes a call to it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from localrun.errors import UserError

ENV_KEY = "LOCALRUN_API_KEY"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def api_key(*, key: str | None, key_file: str | None) -> str | None:
    """--api-key, else the first line of --api-key-file, else $LOCALRUN_API_KEY, else None."""
    if key is not None and key_file is not None:
        raise UserError("Pass the API key once: --api-key or --api-key-file, not both.")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise UserError(f"Cannot read the API key file {key_file}: {exc.strerror}.") from None
        key = lines[0] if lines else ""
    elif key is None:
        key = os.environ.get(ENV_KEY)
    if key is not None and not key.strip():
        raise UserError("The API key is empty: put a key in the file, the flag or $LOCALRUN_API_KEY.")
    return key.strip() if key is not None else None


def check_exposure(host: str, key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(host) and key is None:
        raise UserError(
            f"Listening on {host} would let any machine on the network use the model: add --api-key-file FILE (or set ${ENV_KEY}), or listen on 127.0.0.1."
        )
