"""Who may reach a server localrun starts (the web UI, the API server): one rule for both.

Listening on loopback needs nothing. Listening on any other address, or publishing a share link, needs
credentials, and they are read from a file or an environment variable so they stay out of `ps`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from localrun.errors import UserError


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; any other name or address counts as reachable from outside."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_auth(host: str, *, share: bool = False, credentials: object | None, flag: str = "--auth-file") -> None:
    """Refuse to serve other machines without credentials: a non-loopback host, or a share link."""
    if credentials:
        return
    if share:
        raise UserError(f"--share publishes the server on a public link: add a login with {flag}, or drop --share.")
    if not is_loopback(host):
        raise UserError(
            f"--host {host} makes the server reachable from other machines: add a login with {flag}, "
            "or listen on 127.0.0.1."
        )


def credential_text(
    *, inline: str | None, file: str | None, env_var: str, inline_flag: str, file_flag: str
) -> str | None:
    """The secret from exactly one place: FILE's first line, the inline flag, or the environment variable."""
    if inline is not None and file is not None:
        raise UserError(f"Give either {inline_flag} or {file_flag}, not both.")
    if file is not None:
        path = Path(file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise UserError(f"Cannot read {file_flag} {path}: {reason}.") from None
        text = lines[0].strip() if lines else ""
        if not text:
            raise UserError(f"{file_flag} {path} is empty: put the secret on its first line.")
        return text
    if inline is not None:
        return inline
    return os.environ.get(env_var) or None


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now (connections in TIME_WAIT from a previous run do not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
