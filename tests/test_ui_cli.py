"""`localrun ui` flags: loopback by default, --auth format, --port choice; the command stays cheap to register."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from localrun.cli import build_parser, main
from localrun.errors import UserError
from ui.cli import DEFAULT_PORT, parse_auth, pick_port


def test_defaults_bind_to_loopback() -> None:
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.port is None and not args.share and args.auth is None


def test_auth_needs_user_and_password() -> None:
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    assert parse_auth(None) is None
    for bad in ("alice", "alice:", ":pw"):
        with pytest.raises(UserError, match="USER:PASSWORD"):
            parse_auth(bad)


def test_bad_auth_exits_2_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_port_in_use_is_a_user_error_and_default_skips_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"Port {port}"):
            pick_port("127.0.0.1", port)
    assert pick_port("127.0.0.1", None) >= DEFAULT_PORT


def test_help_does_not_import_gradio() -> None:
    code = "import sys; from localrun.cli import build_parser; build_parser(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_register_adds_the_ui_command() -> None:
    from ui.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    assert "ui" in sub.choices


def _outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_login_is_required_and_only_loopback_listens(tmp_path) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    from test_ui_api import run_ui

    with run_ui(tmp_path, args=("--auth", "alice:s3cret")) as url:
        with pytest.raises(Exception):  # noqa: B017 - the client raises different errors across versions
            gradio_client.Client(url, verbose=False)
        client = gradio_client.Client(url, auth=("alice", "s3cret"), verbose=False)
        assert client.predict(api_name="/worker_status")["crashes"] == 0
        outside = _outside_address()
        if outside is not None:
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=3).close()
