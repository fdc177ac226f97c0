"""`localrun ui` flags: loopback by default, --auth format, --port choice; the command stays cheap to register."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from localrun.cli import build_parser, main
from localrun.errors import UserError
from localrun.netpolicy import is_loopback
from ui.cli import DEFAULT_PORT, login, parse_auth, pick_port


def test_defaults_bind_to_loopback() -> None:
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.port is None and not args.share and args.auth is None
    assert args.auth_file is None


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


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", "", "127.0.0.1.evil.com"):
        assert not is_loopback(host), host


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "::"], ["--host", "192.168.1.5"], ["--share"]])
def test_network_without_login_exits_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOCALRUN_AUTH", raising=False)
    assert main(["ui", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localrun: --") and err.count("\n") == 1
    assert "--auth-file" in err and ("other machines" in err or "public link" in err)


def test_ui_host_0000_process_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_AUTH"}
    done = subprocess.run(
        [sys.executable, "-m", "localrun.cli", "ui", "--host", "0.0.0.0"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "reachable from other machines" in done.stderr


def test_login_from_file_env_or_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    secret = tmp_path / "login"
    secret.write_text("alice:s3cret\n\ndave:pw2\n")  # one login a line: each user has their own chats
    monkeypatch.delenv("LOCALRUN_AUTH", raising=False)
    assert login(parser.parse_args(["ui"])) is None
    assert login(parser.parse_args(["ui", "--auth-file", str(secret)])) == [("alice", "s3cret"), ("dave", "pw2")]
    monkeypatch.setenv("LOCALRUN_AUTH", "bob:pw")
    assert login(parser.parse_args(["ui"])) == [("bob", "pw")]
    assert login(parser.parse_args(["ui", "--auth", "carol:x"])) == [("carol", "x")]  # a flag wins over the env
    (tmp_path / "twice").write_text("erin:a\nerin:b\n")
    with pytest.raises(UserError, match="names a user twice"):
        login(parser.parse_args(["ui", "--auth-file", str(tmp_path / "twice")]))
    with pytest.raises(UserError, match="not both"):
        login(parser.parse_args(["ui", "--auth", "a:b", "--auth-file", str(secret)]))
    with pytest.raises(UserError, match="Cannot read --auth-file"):
        login(parser.parse_args(["ui", "--auth-file", str(tmp_path / "missing")]))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        login(parser.parse_args(["ui", "--auth-file", str(tmp_path / "empty")]))
    monkeypatch.setenv("LOCALRUN_AUTH", "no-colon")
    with pytest.raises(UserError, match="USER:PASSWORD"):
        login(parser.parse_args(["ui"]))


def _status(url: str, *, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_login_is_required_and_only_loopback_listens(tmp_path: Path) -> None:
    import psutil

    gradio_client = pytest.importorskip("gradio_client")
    from test_ui_api import run_ui

    secret = tmp_path / "login"
    secret.write_text("alice:s3cret\n")
    with run_ui(tmp_path, args=("--auth-file", str(secret))) as url:
        assert _status(url + "gradio_api/login_check") == 401  # no session: refused
        form = urllib.parse.urlencode({"username": "alice", "password": "wrong"}).encode()
        assert _status(url + "login", data=form) == 400
        form = urllib.parse.urlencode({"username": "alice", "password": "s3cret"}).encode()
        assert _status(url + "login", data=form) == 200
        client = gradio_client.Client(url, auth=("alice", "s3cret"), verbose=False)
        assert client.predict(api_name="/worker_status")["crashes"] == 0
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        listening = [c for c in psutil.net_connections("inet") if c.laddr.port == port and c.status == "LISTEN"]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
        # The password is in the file, not on any command line.
        for proc in psutil.process_iter(["cmdline"]):
            assert "s3cret" not in " ".join(proc.info["cmdline"] or [])
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=3).close()
