"""`localrun chat` one-shot mode and its error cases, run as a user would (a subprocess)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import llama_device, nvidia_gpus


def _stats_line() -> re.Pattern[str]:
    """The one-shot stats line, ending in the device llama.cpp runs on here."""
    return re.compile(
        r"TTFT \d+ ms · \d+ (new )?prompt tokens?[^·]* · gen [\d.]+ tok/s · \d+ tok · RAM \d+ MB · llamacpp/"
        + llama_device()
    )


def _one_sentence_error(result, *, contains: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localrun: ") and lines[0].endswith((".", "?"))
    assert contains.lower() in lines[0].lower(), lines[0]


def test_one_shot_answers_on_stdout_with_stats_on_stderr(cli):
    result = cli("chat", "-p", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert _stats_line().search(result.stderr), result.stderr
    assert "TTFT" not in result.stdout


def test_pipe_mode_reads_stdin(cli):
    result = cli("chat", "--max-tokens", "8", "--no-stats", input="Say hello.\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stderr.strip() == ""


@pytest.fixture
def broken_files(tmp_path, default_gguf):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are my notes, not a model\n")
    truncated = tmp_path / "truncated.gguf"
    with open(default_gguf, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(20_000_000))
    corrupt = tmp_path / "corrupt.gguf"
    shutil.copyfile(default_gguf, corrupt)
    with open(corrupt, "r+b") as fh:  # a tensor count far beyond what the file holds
        fh.seek(8)
        fh.write((10**12).to_bytes(8, "little"))
    header_only = tmp_path / "header.gguf"
    with open(default_gguf, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(6))
    return {
        "not_gguf": not_gguf,
        "truncated": truncated,
        "corrupt": corrupt,
        "header_only": header_only,
        "dir": tmp_path,
    }


@pytest.mark.parametrize(
    ("case", "contains"),
    [
        ("missing", "no such file"),
        ("dir", "directory"),
        ("not_gguf", "not a gguf"),
        ("truncated", "truncated"),
        ("corrupt", "gguf"),
        ("header_only", "gguf"),
        ("unknown_name", "unknown model"),
    ],
)
def test_bad_model_gives_one_sentence_and_exit_2(cli, broken_files, case, contains):
    target = {"missing": str(broken_files["dir"] / "nope.gguf"), "unknown_name": "smollm-does-not-exist"}.get(case)
    result = cli("chat", target or str(broken_files[case]), "-p", "hi")
    _one_sentence_error(result, contains=contains)


@pytest.mark.parametrize("how", ["flag", "pipe"])
def test_empty_prompt(cli, how):
    result = cli("chat", "-p", "  ") if how == "flag" else cli("chat", input="\n")
    _one_sentence_error(result, contains="empty")


def test_bad_setting_value(cli):
    result = cli("chat", "-p", "hi", "--temperature", "-1")
    _one_sentence_error(result, contains="temperature")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-tokens", "2000000"), ("--n-ctx", "100000000"), ("--seed", "4294967296"), ("--seed", "-1")],
)
def test_settings_have_upper_bounds(cli, flag, value):
    result = cli("chat", "-p", "hi", flag, value)
    _one_sentence_error(result, contains=flag.removeprefix("--").replace("-", "_"))


def test_cli_imports_no_heavy_library_until_needed():
    code = (
        "import sys; from localrun.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'llama_cpp', 'transformers', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _commands(parser) -> set[str]:
    return {name for a in parser._subparsers._group_actions for name in a.choices}


def test_each_command_registers_from_its_own_module_alone():
    from localrun.cli import COMMANDS, build_parser

    every = _commands(build_parser())
    assert set(COMMANDS) <= every and every - set(COMMANDS) <= {"ui"}  # the UI plugs in by entry point
    for command in COMMANDS:
        assert command in _commands(build_parser([command, "--help"]))


def test_a_chat_command_imports_no_other_command():
    code = (
        "import sys; from localrun.cli import build_parser; build_parser(['chat', '-p', 'hi']); "
        "print(sorted(m for m in sys.modules if m.startswith(('localrun.cli.', 'ui')) or m == 'gguf'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['localrun.cli.chat']"


def test_devices_lists_the_cpu_and_each_gpu(cli):
    result = cli("devices")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cpu:0 ")
    assert "physical cores" in result.stdout
    gpus = nvidia_gpus()
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("cuda:")]
    assert listed == [f"cuda:{i}" for i in range(len(gpus))]
    assert ("No GPU found" in result.stderr) == (not gpus)


def test_llama_backend_loads_only_llama_cpps_bindings_until_more_is_asked_for(default_gguf):
    """The chat path drives llama.cpp's C API: it skips llama-cpp-python's high-level modules, numpy and
    pydantic (cold start), and code asking the package for more (`llama_cpp.Llama`, dir()) still gets the
    whole package."""
    code = (
        "import sys\n"
        "from localrun.backends import load_backend\n"
        "from localrun.settings import LoadOptions, SamplingParams\n"
        "from localrun.engine.generate import generate\n"
        "b = load_backend(sys.argv[1], LoadOptions(n_ctx=256))\n"
        "s = generate(b, b.tokenize(b.render_chat([{'role': 'user', 'content': 'Hi'}])), SamplingParams(max_tokens=4))\n"
        "assert s.generated_tokens == 4, s\n"
        "heavy = ('llama_cpp.llama', 'llama_cpp.llama_chat_format', 'numpy', 'pydantic')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "import llama_cpp\n"
        "from importlib.metadata import version\n"
        "assert 'LLAMA_FTYPE_MOSTLY_Q8_0' in dir(llama_cpp) and 'Llama' in dir(llama_cpp)\n"
        "print(llama_cpp.Llama.__name__, llama_cpp.__version__ == version('llama_cpp_python'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(default_gguf)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    light, full = done.stdout.splitlines()
    assert light == "[]"
    assert full == "Llama True"


def test_bench_with_clients_runs_them_at_once_through_the_slots_serve_uses(cli):
    import json

    result = cli("bench", "--clients", "1,2", "--n-prompt", "32", "--n-gen", "8", "--reps", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "localrun (this machine)" and report["backend"] == "llamacpp"
    assert report["slots"] >= 2  # serve's default: as many slots as fit, so both clients decode together
    assert [row["clients"] for row in report["levels"]] == [1, 2]
    for row in report["levels"]:
        assert row["generated_tokens"] == 8 and row["prompt_tokens"] > 16
        assert row["ttft_s"]["p50"] > 0 and row["decode_tps"] > 0 and row["total_tps"] > 0
        assert row["peak_ram_bytes"] > 50e6
    refused = cli("bench", "--clients", "1,x")
    assert refused.returncode == 2 and "--clients takes numbers" in refused.stderr
