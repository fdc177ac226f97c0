"""A model without a chat template: one-shot prompts are plain completions; the REPL keeps the fallback
User:/Assistant: template, stops where the model starts the user's next turn, and says so when ready."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO, rewrite_gguf, run_localrun

from localrun.settings import LoadOptions, SamplingParams


@pytest.fixture(scope="module")
def bare_gguf(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model copied with its `tokenizer.chat_template` key removed (all else byte-identical)."""
    path = tmp_path_factory.mktemp("bare") / "SmolLM2-no-template.gguf"
    return rewrite_gguf(default_gguf, path, drop=("tokenizer.chat_template",))


def test_one_shot_is_a_plain_completion(bare_gguf: Path) -> None:
    from localrun.backends import load_backend
    from localrun.engine.generate import generate

    prompt = "The capital of France is"
    done = run_localrun("chat", str(bare_gguf), "-p", prompt, "--temperature", "0", "--max-tokens", "16", "--no-stats")
    assert done.returncode == 0, done.stderr
    backend = load_backend(bare_gguf, LoadOptions(n_ctx=512))
    try:
        assert not backend.report.chat_template and "no chat template" in backend.report.describe()
        expected = generate(backend, backend.tokenize(prompt), SamplingParams(temperature=0.0, max_tokens=16)).text
    finally:
        backend.close()
    # the continuation of the bare text: no "User:" role was put around it
    assert done.stdout == expected + "\n" and expected.strip()


def test_repl_says_no_chat_template(bare_gguf: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable, ["-m", "localrun.cli", "chat", str(bare_gguf)], cwd=str(REPO), encoding="utf-8", timeout=120
    )
    try:
        child.expect(r"Ready: .*no chat template")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_chat_under_the_fallback_template_stops_at_the_next_user_turn(bare_gguf: Path) -> None:
    from localrun.backends import load_backend
    from localrun.engine.chat import ChatSession
    from localrun.engine.generate import generate

    history = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    backend = load_backend(bare_gguf, LoadOptions(n_ctx=1024))
    try:
        # Without the stop, the model goes on to write the user's next turn itself ...
        plain = generate(backend, backend.tokenize(backend.render_chat(history)), params).text
        assert "\nUser:" in plain
        # ... and a chat turn ends exactly where that turn would begin.
        *_, last = ChatSession(backend).answer(history, params)
    finally:
        backend.close()
    assert last.finish_reason == "stop" and last.summary.text == plain[: plain.index("\nUser:")]
