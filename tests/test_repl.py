"""The interactive REPL driven through a pseudo-terminal, as a person would type."""

from __future__ import annotations

import sys

import pexpect
import pytest
from conftest import REPO

PROMPT = ">>> "


@pytest.fixture
def repl():
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun.cli", "chat", "--max-tokens", "400"],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect("Ready: llamacpp on cpu")
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_set_clear_stats_and_bye(repl):
    repl.sendline("/set temperature 0")
    repl.expect_exact("temperature = 0.0")
    repl.expect_exact(PROMPT)
    repl.sendline("/set max_tokens 12")
    repl.expect_exact("max_tokens = 12")
    repl.sendline("/set temperature hot")
    repl.expect("Invalid temperature: Input should be a valid number")
    repl.sendline("/set colour blue")
    repl.expect("Usage: /set NAME VALUE")
    repl.expect_exact(PROMPT)
    repl.sendline("What is the capital of France?")
    repl.expect(r"TTFT \d+ ms · prompt [\d.]+ tok/s · gen [\d.]+ tok/s · \d+ tok")
    repl.expect_exact(PROMPT)
    repl.sendline("/stats")
    repl.expect("time to first token")
    repl.expect_exact(PROMPT)
    repl.sendline("/clear")
    repl.expect_exact("Conversation cleared.")
    repl.sendline("/bye")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session(repl):
    repl.sendline("Write a very long story about a dragon who learns to cook.")
    repl.expect_exact("cook.\r\n")  # the terminal's echo of the line
    repl.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    repl.sendintr()
    repl.expect_exact("[stopped]")
    repl.expect_exact(PROMPT)
    repl.sendline("/set max_tokens 8")
    repl.sendline("Say hi.")
    repl.expect(r"TTFT \d+ ms")
    repl.expect_exact(PROMPT)
    repl.sendeof()  # Ctrl-D exits
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_multiline_input_and_system_prompt(repl):
    repl.sendline("/set max_tokens 8")
    repl.sendline("/system You answer in one word.")
    repl.expect_exact("System prompt set")
    repl.sendline('"""')
    repl.sendline("First line")
    repl.sendline('second line"""')
    repl.expect(r"TTFT \d+ ms")
    repl.expect_exact(PROMPT)
    repl.sendline("/nonsense")
    repl.expect("Unknown command /nonsense")
    repl.sendline("/bye")
    repl.expect(pexpect.EOF)
