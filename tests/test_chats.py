"""The chat store, export/import, the REPL's saved chats and replay, on the real default model."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO, run_localrun

from localrun.chat_io import export_data, export_json, read_export
from localrun.chats import SCHEMA_VERSION, ChatRecorder, ChatStore
from localrun.errors import UserError

PROMPT = ">>> "


@pytest.fixture
def store(tmp_path: Path) -> ChatStore:
    return ChatStore(tmp_path / "chats.sqlite")


def _turn(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a, "figures": {"ttft_s": 0.1}}]


def test_store_keeps_chats_per_owner_with_search_rename_delete_and_undo(store: ChatStore) -> None:
    a = store.create(title="Capitals", owner="alice")
    b = store.create(title="Cooking", owner="bob")
    store.save_messages(a, _turn("What is the capital of France?", "Paris."))
    store.save_messages(b, _turn("How long to boil an egg?", "Nine minutes."))
    assert [c.id for c in store.list(owner="alice")] == [a]
    assert [c.id for c in store.list(owner="bob", query="egg")] == [b]
    assert store.list(owner="alice", query="egg") == []  # search never crosses owners
    assert [c.id for c in store.list(query="PARIS")] == [a]  # text, case-insensitive
    assert store.list(query="100%_") == []  # LIKE wildcards are literal
    with pytest.raises(UserError, match="no chat"):
        store.rename(a, "Mine now", owner="bob")
    store.rename(a, "  European   capitals ", owner="alice")
    assert store.info(a).title == "European capitals"
    store.delete(a, owner="alice")
    assert store.list(owner="alice") == []
    store.restore(a, owner="alice")
    assert store.messages(a)[1]["content"] == "Paris."
    assert store.messages(a)[1]["figures"] == {"ttft_s": 0.1}
    store.purge(a)
    with pytest.raises(UserError):
        store.restore(a)


def test_a_failed_write_keeps_the_conversation_before_it(store: ChatStore) -> None:
    chat = store.create()
    store.save_messages(chat, _turn("Hi", "Hello!"))
    with pytest.raises(UserError, match="needs a role"):
        store.save_messages(chat, [*_turn("Hi", "Hello!"), {"role": "robot", "content": "x"}])
    assert [m["content"] for m in store.messages(chat)] == ["Hi", "Hello!"]


def test_schema_version_and_migration(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite"
    sqlite3.connect(path).close()  # an empty file: version 0, migrated on open
    ChatStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer localrun"):
        ChatStore(path)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not readable"):
        ChatStore(tmp_path / "junk.sqlite")


def test_sha256_is_computed_once_per_file(store: ChatStore, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"abc")
    first = store.sha256_of(model)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    model.write_bytes(b"abcd")  # another size: hashed again
    assert store.sha256_of(model) != first
    assert store.sha256_of(tmp_path) is None


def test_recorder_replaces_a_regenerated_reply(store: ChatStore) -> None:
    rec = ChatRecorder(store)
    rec.record(_turn("Q", "first answer"), {"model": "m"}, system="be brief")
    rec.record(_turn("Q", "second answer"), {"model": "m2"}, system="be brief")
    messages = store.messages(rec.chat_id)
    assert [m["content"] for m in messages] == ["Q", "second answer"]
    assert messages[1]["model"] == "m2" and store.info(rec.chat_id).system == "be brief"


def _env(tmp_path: Path, name: str = "chats.sqlite") -> dict:
    return {"LOCALRUN_CHATS": str(tmp_path / name)}


def test_one_shot_saves_only_with_save_and_export_import_is_lossless(tmp_path: Path, cli) -> None:
    env = _env(tmp_path)
    ask = ("chat", "-p", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24")
    assert cli(*ask, env=env).returncode == 0
    assert ChatStore(tmp_path / "chats.sqlite").list() == []  # no --save: nothing kept
    done = cli(*ask, "--save", env=env)
    assert done.returncode == 0, done.stderr
    store = ChatStore(tmp_path / "chats.sqlite")
    [chat] = store.list()
    reply = store.messages(chat.id)[1]
    assert reply["model"] == "smollm2-135m-instruct" and reply["run"]["quant"] == "Q4_1"
    assert reply["run"]["sampling"]["temperature"] == 0.0 and reply["run"]["seed"] is not None
    assert reply["figures"]["generated_tokens"] > 0 and reply["figures"]["ttft_s"] > 0
    assert reply["figures"]["peak_ram_bytes"] > 0 and reply["figures"]["finish_reason"] in ("stop", "length")

    out = tmp_path / "export.json"
    assert cli("chats", "export", "-o", str(out), env=env).returncode == 0
    assert json.loads(out.read_text())["chats"][0]["messages"][1]["sha256"]  # filled in for the export
    md = cli("chats", "export", "--markdown", env=env)
    assert "**Assistant** · smollm2-135m-instruct · Q4_1" in md.stdout and "TTFT" in md.stdout
    other = _env(tmp_path, "other.sqlite")
    done = cli("chats", "import", str(out), env=other)
    assert done.returncode == 0, done.stderr
    # every stored row comes back as it was (the export filled the file's sha256 in, in the store too)
    assert store.rows() == ChatStore(tmp_path / "other.sqlite").rows()
    assert store.messages(chat.id)[1]["sha256"] == json.loads(out.read_text())["chats"][0]["messages"][1]["sha256"]
    again = cli("chats", "import", str(out), env=other)  # its id is taken now: a new one
    assert again.returncode == 0 and "got a new id" in again.stderr
    assert len(ChatStore(tmp_path / "other.sqlite").list()) == 2


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a localrun chat export"),
        ('{"format": "something-else", "chats": []}', "not a localrun chat export"),
        ('{"format": "localrun.chats", "version": 99, "chats": []}', "version 99"),
        ("\xff\xfe", "not JSON"),
        ("[" * 100_000, "not"),
    ],
)
def test_import_refuses_what_it_cannot_read(tmp_path: Path, cli, content: str, says: str) -> None:
    env = _env(tmp_path)
    store = ChatStore(tmp_path / "chats.sqlite")
    store.save_messages(store.create(title="kept"), _turn("a", "b"))
    before = store.rows()
    bad = tmp_path / "bad.json"
    bad.write_bytes(content.encode("utf-8", "surrogateescape") if content != "\xff\xfe" else b"\xff\xfe\x00")
    done = cli("chats", "import", str(bad), env=env)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert store.rows() == before


def test_import_is_all_or_nothing(tmp_path: Path, store: ChatStore) -> None:
    good = store.create(title="good")
    store.save_messages(good, _turn("a", "b"))
    data = export_data(store, [good])
    broken = json.loads(export_json(data))["chats"][0]
    broken["messages"][1]["role"] = "wizard"
    data["chats"] = [data["chats"][0], broken]
    path = store.path.parent / "half.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"chats\[1\]\.messages\[1\]\.role"):
        read_export(path)
    fresh = ChatStore(store.path.parent / "fresh.sqlite")
    assert fresh.rows() == {"chats": [], "messages": []}


def _repl(env: dict, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun.cli", "chat", "--temperature", "0", "--max-tokens", "40", *args],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 200),
        env={**__import__("os").environ, **env},
    )
    child.expect_exact("Type /help for commands.")
    child.expect_exact(PROMPT)
    return child


def _ask(child: pexpect.spawn, text: str) -> None:
    child.sendline(text)
    child.expect(r"TTFT \d+ ms · (\d+) (new )?prompt tokens?")
    child.expect_exact(PROMPT)


def test_repl_saves_resumes_and_replays_identically(tmp_path: Path) -> None:
    env = _env(tmp_path)
    child = _repl(env)
    _ask(child, "My name is Ada and I live in Paris.")
    child.sendline("/save Ada in Paris")
    child.expect(r"Saved as chat (\w+) \"Ada in Paris\"")
    chat_id = child.match.group(1)
    _ask(child, "Where do I live?")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    store = ChatStore(tmp_path / "chats.sqlite")
    assert [c.id for c in store.list()] == [chat_id] and len(store.messages(chat_id)) == 4

    child = _repl(env, "--resume", "last")
    assert f"Resumed chat {chat_id}" in child.before
    child.sendline("/chats")
    child.expect(rf"\* {chat_id}\s+4 msgs\s+Ada in Paris")
    child.expect_exact(PROMPT)
    child.sendline("What is my name?")
    child.expect(r"TTFT \d+ ms · (\d+) (new )?prompt tokens?")
    resumed_prompt = int(child.match.group(1))
    child.expect_exact(PROMPT)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    messages = store.messages(chat_id)
    assert len(messages) == 6  # the same chat continued
    first_prompt = messages[1]["figures"]["prompt_tokens"]
    # the saved turns were evaluated again: the resumed reply's prompt holds the whole conversation
    assert (
        messages[5]["figures"]["prompt_tokens"]
        == resumed_prompt
        > messages[3]["figures"]["prompt_tokens"]
        > first_prompt
    )

    done = run_localrun("chats", "replay", chat_id, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 of 3 replies identical" in done.stderr
    assert done.stdout.count("identical") == 3 and "TTFT" in done.stdout and "→" in done.stdout


def test_replay_on_another_quant_shows_the_first_difference_and_the_sha256(
    tmp_path: Path, default_gguf: Path, cli
) -> None:
    env = _env(tmp_path)
    ask = ("chat", "-p", "Write three sentences about the sea.", "--temperature", "0", "--max-tokens", "48", "--save")
    assert cli(*ask, env=env).returncode == 0
    out = tmp_path / "q"
    out.mkdir()
    done = cli(
        "quantize", str(default_gguf), "--to", "Q2_K", "-o", str(out), "--allow-requantize", env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    [other] = out.glob("*.gguf")
    done = cli("chats", "replay", "last", "--model", str(other), env=env, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "differs from character" in done.stdout
    assert "the model file is not the one saved: sha256" in done.stdout


def test_a_one_shot_answer_that_resumes_a_chat_continues_it(tmp_path: Path, cli) -> None:
    """`-p` saves only with --save, but a `-p` that continues a saved chat (--resume) adds its turn to it."""
    env = _env(tmp_path)
    params = ("--temperature", "0", "--max-tokens", "16")
    assert cli("chat", "-p", "My name is Ada.", *params, env=env).returncode == 0
    assert ChatStore(tmp_path / "chats.sqlite").list() == []  # no --save: nothing kept
    assert cli("chat", "-p", "My name is Ada.", *params, "--save", env=env).returncode == 0
    done = cli("chat", "-p", "What is my name?", *params, "--resume", "last", env=env)
    assert done.returncode == 0, done.stderr
    store = ChatStore(tmp_path / "chats.sqlite")
    [chat] = store.list()
    assert [m["content"] for m in store.messages(chat.id)][::2] == ["My name is Ada.", "What is my name?"]
