"""Thinking models: the block split from the answer (the engine, the CLI, the API), the thinking budget, thinking
turned off, and a JSON schema or a forced tool call after thinking.

The models are the real default model and tiny random GGUFs, each given a chat template of one family's kind
(the templates are written here): Qwen3's (ChatML, `enable_thinking` writes an empty block), DeepSeek-R1's (the
generation prompt opens `<think>`) and gpt-oss's (analysis and final channels, `reasoning_effort`). The default
model was never trained to think, so it rarely ends a block itself: the budget is what ends it, which is what
these tests need to be deterministic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from conftest import REPO, cached_build, rewrite_gguf, run_localrun

from localrun.engine import reasoning
from localrun.engine.jobs import build_prompt, run
from localrun.engine.messages import GenerateRequest
from localrun.settings import LoadOptions, SamplingParams

_TURNS = "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor -%}"
QWEN3_KIND = (
    _TURNS + "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{%- endif %}"
)
R1_KIND = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor -%}{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
GPT_OSS_KIND = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{%- for m in messages %}{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>"
    "{{ m['content'] }}<|end|>{% elif m['role'] != 'system' %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}"
    "<|end|>{% endif %}{% endfor -%}{%- if add_generation_prompt %}<|start|>assistant{% endif %}"
)
MARKERS = ("<think>", "</think>", "<|channel|>", "<|end|>", "<|message|>")
ASK = [{"role": "user", "content": "Explain step by step why the sky looks blue in the daytime."}]


def _with_template(src: Path, factory, name: str, template: str) -> Path:
    path = factory.mktemp("thinking") / f"{name}.gguf"
    return rewrite_gguf(src, path, strings={"tokenizer.chat_template": template})


@pytest.fixture(scope="module")
def r1_gguf(default_gguf, tmp_path_factory) -> Path:
    return _with_template(default_gguf, tmp_path_factory, "smollm2-r1-kind", R1_KIND)


@pytest.fixture(scope="module")
def qwen3_gguf(default_gguf, tmp_path_factory) -> Path:
    return _with_template(default_gguf, tmp_path_factory, "smollm2-qwen3-kind", QWEN3_KIND)


@pytest.fixture(scope="module")
def oss_gguf(default_gguf, tmp_path_factory) -> Path:
    return _with_template(default_gguf, tmp_path_factory, "smollm2-gpt-oss-kind", GPT_OSS_KIND)


def _load(path: Path):
    from localrun.backends import load_backend

    return load_backend(path, LoadOptions(n_ctx=2048))


def _answer(backend, params: SamplingParams, messages=ASK):
    """(reasoning streamed, content streamed, summary) of one chat turn through the engine."""
    thought, text, summary = [], [], None
    for event in run(backend, GenerateRequest.chat(messages, params)):
        thought.append(event.reasoning)
        text.append(event.text)
        summary = event.summary or summary
    return "".join(thought), "".join(text), summary


# ---- the parser ---------------------------------------------------------------------------------------------


def _split(fmt, text: str, *, starts_open: bool, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    splitter = reasoning.ReasoningSplitter(fmt, starts_open=starts_open)
    out_r, out_c, i = [], [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        r, c = splitter.feed(text[i : i + n])
        out_r.append(r)
        out_c.append(c)
        i += n
    r, c = splitter.flush()
    return "".join(out_r) + r, "".join(out_c) + c


@pytest.mark.parametrize("seed", range(12))
def test_splitter_across_any_chunking(seed: int) -> None:
    """Markers cut at any point between pieces: the thinking and the answer come out whole, no marker in either."""
    think = reasoning.detect(QWEN3_KIND)
    oss = reasoning.detect(GPT_OSS_KIND)
    cases = [
        (
            think,
            "<think>\nfirst, the light</think>\n\nBlue light scatters.",
            False,
            "first, the light",
            "Blue light scatters.",
        ),
        (think, "the prompt opened it</think>\n\nAnswer.", True, "the prompt opened it", "Answer."),
        (think, "No block at all: <b>bold</b>.", False, "", "No block at all: <b>bold</b>."),
        (think, "<think>cut</think>\n\nthe answer, then </think> again", False, "cut", "the answer, then  again"),
        (
            oss,
            "<|channel|>analysis<|message|>let me see<|end|><|start|>assistant<|channel|>final<|message|>Hi.",
            False,
            "let me see",
            "Hi.",
        ),
        (oss, "<|channel|>final<|message|>Straight to it.", False, "", "Straight to it."),
    ]
    for fmt, text, starts_open, want_r, want_c in cases:
        got_r, got_c = _split(fmt, text, starts_open=starts_open, seed=seed)
        assert (got_r.strip(), got_c) == (want_r, want_c), text


def test_formats_come_from_the_template() -> None:
    assert reasoning.detect(QWEN3_KIND).toggle == "enable_thinking"
    assert reasoning.detect(R1_KIND).toggle is None and reasoning.detect(R1_KIND).open == "<think>"
    assert reasoning.detect(GPT_OSS_KIND).effort and reasoning.detect(GPT_OSS_KIND).specials
    assert reasoning.detect("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None
    assert reasoning.detect(None) is None


# ---- the engine on the real default model ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 8, 24])
def test_budget_closes_the_block_at_n_tokens(r1_gguf: Path, budget: int) -> None:
    backend = _load(r1_gguf)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=80, think_budget=budget)
        thought, text, s = _answer(backend, params)
    finally:
        backend.close()
    assert s.reasoning_tokens == budget and s.reasoning_cut
    assert (thought.strip() != "") == (budget > 0) and s.reasoning == thought.strip()
    assert text.strip() and s.text == text
    assert not any(m in text for m in MARKERS), text
    assert s.generated_tokens > budget  # the answer came after the block, in the same max_tokens


def test_unbounded_thinking_is_all_reasoning(r1_gguf: Path) -> None:
    """No budget and a model that never ends its block: everything it writes is thinking, none is shown as the
    answer (finish length, as any reply that runs out of tokens)."""
    backend = _load(r1_gguf)
    try:
        thought, text, s = _answer(backend, SamplingParams(temperature=0.0, max_tokens=40, loop_guard=False))
    finally:
        backend.close()
    assert thought.strip() and s.reasoning_tokens == s.generated_tokens
    assert not s.reasoning_cut and s.reasoning_s is not None and s.reasoning_s > 0


def test_think_off_on_a_template_that_can(qwen3_gguf: Path, r1_gguf: Path) -> None:
    """think off: the Qwen3-kind template is told enable_thinking=false and writes the empty block; the R1-kind
    one, which has no switch, gets the block closed by the engine. Either way no thinking comes back."""
    for path, switch in ((qwen3_gguf, True), (r1_gguf, False)):
        backend = _load(path)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=40, think="off")
            prompt = backend.detokenize(build_prompt(backend, GenerateRequest.chat(ASK, params)).ids)
            assert prompt.rstrip().endswith("</think>"), prompt
            thought, text, s = _answer(backend, params)
            assert thought == "" and s.reasoning_tokens == 0 and s.reasoning == ""
            assert text.strip() and not any(m in text for m in MARKERS)
            if switch:  # thinking on: the block is opened by the model or by us, and the budget ends it
                on = SamplingParams(temperature=0.0, max_tokens=40, think="on", think_budget=6)
                thought, text, s = _answer(backend, on)
                assert s.reasoning_tokens in (0, 6)  # the default model may not open a block of its own
        finally:
            backend.close()


def test_channels_template(oss_gguf: Path) -> None:
    """The gpt-oss kind: reasoning_effort reaches the template; the budget closes the analysis channel with
    the model's own markers and opens the final one; no channel marker reaches the answer."""
    backend = _load(oss_gguf)
    try:
        high = SamplingParams(temperature=0.0, max_tokens=60, think="high", think_budget=4)
        prompt = backend.detokenize(build_prompt(backend, GenerateRequest.chat(ASK, high)).ids)
        assert "Reasoning: high" in prompt
        # the model starts the analysis channel only if it wants to; a schema after thinking opens it for it
        schema = high.replace(grammar='root ::= "{" [a-z ]{1,20} "}"')
        thought, text, s = _answer(backend, schema)
    finally:
        backend.close()
    assert s.reasoning_tokens == 4 and s.reasoning_cut and thought.strip()
    assert text.startswith("{") and text.endswith("}") and s.finish_reason == "stop", text
    assert not any(m in text for m in MARKERS)


# ---- tiny random models of two families ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "template"),
    [("qwen2", QWEN3_KIND), ("qwen2", R1_KIND), ("llama", GPT_OSS_KIND)],
    ids=["qwen3", "r1", "gpt-oss"],
)
def test_tiny_random_models(tmp_path: Path, tmp_path_factory, arch: str, template: str) -> None:
    """Random weights write random tokens: the budget alone ends the block, at exactly N tokens, and the answer
    after it holds no marker; think off gives no block on the template that can."""
    import importlib.util

    # loaded by its path: bench/ on sys.path would shadow packages (bench/ui.py is not the ui package)
    spec = importlib.util.spec_from_file_location("bench_tiny_gguf", REPO / "bench" / "tiny_gguf.py")
    tiny_gguf = sys.modules.setdefault("bench_tiny_gguf", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(tiny_gguf)
    write_tiny_gguf = tiny_gguf.write_tiny_gguf

    raw = cached_build(tmp_path_factory, f"tiny-{arch}.gguf", lambda p: write_tiny_gguf(arch, p))
    path = rewrite_gguf(raw, tmp_path / f"tiny-{arch}-thinking.gguf", strings={"tokenizer.chat_template": template})
    backend = _load(path)
    try:
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=30, think="on", think_budget=12, loop_guard=False)
        schema = params.replace(grammar='root ::= "[" [0-9]{1,8} "]"')
        thought, text, s = _answer(backend, schema)
        assert s.reasoning_tokens == 12 and s.reasoning_cut and thought.strip()
        assert text.startswith("[") and text.endswith("]") and s.finish_reason == "stop", text
        if reasoning.detect(template).empty_block:  # <think> templates can answer without thinking; gpt-oss cannot
            thought, text, s = _answer(backend, params.replace(think="off", think_budget=None))
            assert thought == "" and s.reasoning_tokens == 0
    finally:
        backend.close()


# ---- the CLI --------------------------------------------------------------------------------------------------


def test_cli_pipe_gets_the_answer_alone(r1_gguf: Path) -> None:
    """On a pipe the thinking goes to stderr and the answer alone to stdout; --hide-thinking drops it; the
    stats line says how much was thought."""
    args = ("chat", str(r1_gguf), "-p", ASK[0]["content"], "--temperature", "0", "--max-tokens", "60")
    done = run_localrun(*args, "--think-budget", "8", "--no-save")
    assert done.returncode == 0, done.stderr
    backend = _load(r1_gguf)
    try:
        thought, text, _ = _answer(backend, SamplingParams(temperature=0.0, max_tokens=60, think_budget=8))
    finally:
        backend.close()
    assert done.stdout == text + "\n"
    assert thought.strip() in done.stderr and "thought 8 tok" in done.stderr
    hidden = run_localrun(*args, "--think-budget", "8", "--no-save", "--hide-thinking")
    assert hidden.stdout == done.stdout and thought.strip() not in hidden.stderr


# ---- the API ----------------------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def api(r1_gguf: Path, qwen3_gguf: Path, tmp_path_factory):
    """`localrun serve` with both templated models in its store (loaded on request by name)."""
    import os

    from tests.serve_support import KEY, start_server, stop

    home = tmp_path_factory.mktemp("thinking-home")
    for path in (r1_gguf, qwen3_gguf):
        folder = home / "models" / "local" / path.stem
        folder.mkdir(parents=True)
        (folder / path.name).symlink_to(path)
    env = {**os.environ, "LOCALRUN_API_KEY": KEY, "LOCALRUN_HOME": str(home)}
    proc, base = start_server(str(r1_gguf), "--n-ctx", "1024", env=env)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=600)
    yield client
    stop(proc)


def _name(path: Path) -> str:
    """The model's name in the server's store (see the api fixture)."""
    return f"local/{path.stem}:{path.name}"


def _extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


def test_api_reasoning_content_streamed_and_not(api, r1_gguf: Path) -> None:
    ask = {"model": _name(r1_gguf), "messages": ASK, "temperature": 0, "max_tokens": 60}
    whole = api.chat.completions.create(**ask, extra_body={"thinking_budget": 8})
    message = whole.choices[0].message
    thought = _extra(message, "reasoning_content")
    assert thought and message.content and not any(m in message.content for m in MARKERS)
    assert whole.usage.completion_tokens_details.reasoning_tokens == 8
    pieces, content = [], []
    for chunk in api.chat.completions.create(**ask, stream=True, extra_body={"thinking_budget": 8}):
        if chunk.choices:
            delta = chunk.choices[0].delta
            pieces.append(_extra(delta, "reasoning_content") or "")
            content.append(delta.content or "")
    assert "".join(pieces).strip() == thought and "".join(content) == message.content
    # /v1/completions: a prompt that opens the block gets its thinking apart from the text too
    done = api.completions.create(
        model=_name(r1_gguf),
        prompt="<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n<think>\n",
        temperature=0,
        max_tokens=40,
        extra_body={"thinking_budget": 6},
    )
    choice = done.choices[0]
    assert _extra(choice, "reasoning_content") and "</think>" not in choice.text and choice.text.strip()


def test_api_think_off(api, qwen3_gguf: Path) -> None:
    for extra in ({"reasoning_effort": "none"}, {"think": False}):
        reply = api.chat.completions.create(
            model=_name(qwen3_gguf), messages=ASK, temperature=0, max_tokens=30, extra_body=extra
        )
        assert _extra(reply.choices[0].message, "reasoning_content") is None, extra
        assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    bad = openai.BadRequestError
    with pytest.raises(bad, match="think or reasoning_effort"):
        api.chat.completions.create(
            model=_name(qwen3_gguf), messages=ASK, extra_body={"think": True, "reasoning_effort": "low"}
        )


def test_api_schema_and_tool_call_after_thinking(api, r1_gguf: Path) -> None:
    """20 sampled requests each: the thinking is there, and the answer after it is valid JSON of the schema (or
    the forced tool call), ending with finish_reason stop; streamed for half of them."""
    from tests.test_serve_structured import PERSON_SCHEMA, SUBJECTS, _validate

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    }
    for i, subject in enumerate(SUBJECTS):
        ask = {
            "model": _name(r1_gguf),
            "temperature": 0.8,
            "seed": i,
            "max_tokens": 300,
            "extra_body": {"thinking_budget": 12},
        }
        people = [{"role": "user", "content": f"Describe {subject} as JSON."}]
        weather = [{"role": "user", "content": f"What is the weather where {subject} lives?"}]
        if i % 2:
            got = _streamed(api, messages=people, response_format=fmt, **ask)
        else:
            reply = api.chat.completions.create(messages=people, response_format=fmt, **ask)
            got = (_extra(reply.choices[0].message, "reasoning_content"), reply.choices[0].message.content)
            got = (*got, reply.choices[0].finish_reason, None)
        thought, content, finish, _ = got
        assert thought and finish == "stop", content
        _validate(json.loads(content))
        forced = {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        if i % 2:
            thought, _, finish, calls = _streamed(api, messages=weather, **forced, **ask)
        else:
            reply = api.chat.completions.create(messages=weather, **forced, **ask)
            message = reply.choices[0].message
            thought, finish = _extra(message, "reasoning_content"), reply.choices[0].finish_reason
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert thought and finish == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather"
        assert isinstance(json.loads(calls[0][1])["city"], str)


def _streamed(api, **ask):
    thought, content, finish, calls = [], [], None, {}
    for chunk in api.chat.completions.create(stream=True, **ask):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        thought.append(_extra(choice.delta, "reasoning_content") or "")
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            name, args = calls.get(call.index, ("", ""))
            calls[call.index] = (call.function.name or name, args + (call.function.arguments or ""))
        finish = choice.finish_reason or finish
    return "".join(thought).strip(), "".join(content), finish, list(calls.values())


# ---- the REPL on a terminal -----------------------------------------------------------------------------------


def test_repl_dims_the_thinking_and_says_what_was_dropped(r1_gguf: Path) -> None:
    """On a terminal the thinking is dimmed before the answer, the stats line counts it, and once the chat
    outgrows its small context the REPL says that the oldest messages were left out (never silently)."""
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "localrun.cli", "chat", str(r1_gguf), "--n-ctx", "256", "--max-tokens", "60"]
    child = pexpect.spawn(
        sys.executable,
        [*args, "--think-budget", "8", "--temperature", "0", "--no-save"],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 200),
    )
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me about the sea.")
        child.expect_exact("\x1b[2mThinking: ")
        child.expect(r"thought 8 tok / [\d.]+ s \(cut by the budget\)")
        child.expect_exact(">>> ")
        for topic in ("mountains", "forests", "deserts", "rivers"):
            child.sendline(f"Now tell me about {topic}, in detail.")
            index = child.expect(
                [r"oldest messages? \(the system prompt kept\) did not fit the context", r"thought 8 tok"]
            )
            if index == 0:
                break
            child.expect_exact(">>> ")
        else:
            pytest.fail("the REPL never said that messages were left out")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_remote_engine_hands_on_the_thinking(api, r1_gguf: Path) -> None:
    """localrun driving another localrun (the remote backend): the remote's reasoning_content arrives as our
    reasoning, apart from the answer, and the thinking budget travels as the remote's thinking_budget."""
    from localrun.backends import load_backend

    base = str(api.base_url).rstrip("/")
    from tests.serve_support import KEY

    key = Path(REPO / "test-artifacts")
    key.mkdir(exist_ok=True)
    key_file = key / "remote-thinking.key"
    key_file.write_text(KEY)
    remote = load_backend(_name(r1_gguf), LoadOptions(backend="remote", url=base, remote_api_key_file=str(key_file)))
    try:
        thought, text, s = _answer(remote, SamplingParams(temperature=0.0, max_tokens=60, think_budget=8))
    finally:
        remote.close()
    assert thought.strip() and text.strip() and not any(m in text for m in MARKERS)
    assert s.reasoning_tokens == 8 and s.reasoning == thought.strip()
