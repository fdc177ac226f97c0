"""A soak run of `localrun serve`: C clients for M minutes, on loopback, mixing every kind of request a real
client sends, and checking that each one gets its answer or a clear refusal, and that memory stays flat.

The kinds, taken in turn by each client (so every kind runs beside every other):
- chat: a conversation of up to 3 turns (the next turn reuses the slot's cached prefix), then a new one;
- schema: a JSON-schema response_format, whose reply must parse and hold the required keys;
- tool: a forced tool call, whose arguments must parse as JSON;
- cut: a stream read for a few chunks and then hung up on (the server must free the slot and go on);
- completion: a streamed legacy completion, whose usage must count what streamed;
- bad: a request that must be refused with a 4xx and a message (an unknown model, a temperature of 9,
  no messages, a malformed schema).

Every reply is classed: "ok", "length" (an answer cut at max_tokens, finish_reason "length": a schema or
tool reply is not whole JSON then), "refused" (a 4xx that the kind expects), "busy" (429, with the queue
full: the client waits and goes on) or "wrong" (anything else: a 5xx, a transport error, an answer that does not
parse, a bad request accepted). The model process's RSS is read from /metrics every 10 s; its value at the
end must be within 1.1x of its value after the first minute.

Run: python bench/serve_soak.py [--minutes 10] [--clients 4] [--parallel 4] [--max-queue 8]
Writes bench/results/serve-soak.json. Out of CI (it runs for minutes); take it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model, physical_cores, write_result  # noqa: E402
from serve_common import serve  # noqa: E402

KINDS = ("chat", "schema", "tool", "cut", "completion", "bad")
TOPICS = ["rivers", "bread", "owls", "trains", "tea", "glaciers", "violins", "bees", "deserts", "comets"]
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
    "required": ["name", "country"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Client:
    """One client thread's loop: the kinds in turn, each reply classed into `outcomes`."""

    def __init__(self, index: int, base: str, model: str, deadline: float, max_tokens: int) -> None:
        import openai

        self.index, self.model, self.deadline, self.max_tokens = index, model, deadline, max_tokens
        # no retries: a 429 is counted, then the client waits a moment itself
        self.api = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.wrong: list[str] = []
        self.conversation: list[dict] = []
        self.n = 0

    def run(self) -> None:
        import openai

        step = self.index  # each client starts at another kind
        while time.monotonic() < self.deadline:
            kind = KINDS[step % len(KINDS)]
            step += 1
            self.n += 1
            try:
                outcome = getattr(self, kind)()
            except openai.RateLimitError:
                outcome = "busy"
                time.sleep(0.5)
            except openai.APIStatusError as exc:
                outcome = "wrong"
                self._note(kind, f"HTTP {exc.status_code}: {exc.message}")
            except (openai.APIError, ValueError, KeyError, TypeError) as exc:
                outcome = "wrong"
                self._note(kind, f"{type(exc).__name__}: {exc}")
            self.outcomes[(kind, outcome)] += 1

    def _note(self, kind: str, what: str) -> None:
        if len(self.wrong) < 20:
            self.wrong.append(f"client {self.index} {kind}: {what}")

    def _topic(self) -> str:
        return TOPICS[(self.n + self.index) % len(TOPICS)]

    def chat(self) -> str:
        if len(self.conversation) >= 6:  # three turns: start again
            self.conversation = []
        self.conversation.append({"role": "user", "content": f"Tell me one thing about {self._topic()}."})
        reply = self.api.chat.completions.create(
            model=self.model, messages=self.conversation, max_tokens=self.max_tokens, temperature=0.7
        )
        text = reply.choices[0].message.content or ""
        if not text.strip() or reply.usage.completion_tokens < 1:
            raise ValueError("an empty reply")
        self.conversation.append({"role": "assistant", "content": text})
        return "ok"

    def schema(self) -> str:
        reply = self.api.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Name a city and its country, as JSON."}],
            max_tokens=80,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
        )
        choice = reply.choices[0]
        if choice.finish_reason == "length":  # an answer, cut where it was asked to be: not JSON yet
            return "length"
        data = json.loads(choice.message.content)
        if not {"name", "country"} <= data.keys():
            raise ValueError(f"the reply {data!r} lacks a required key")
        return "ok"

    def tool(self) -> str:
        reply = self.api.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": f"What is the weather in the city of {self._topic()}?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=120,
            temperature=0,
        )
        if reply.choices[0].finish_reason == "length":  # a model that rambles inside the arguments
            return "length"
        calls = reply.choices[0].message.tool_calls or []
        if not calls or calls[0].function.name != "get_weather":
            raise ValueError("no get_weather call in a forced tool call")
        json.loads(calls[0].function.arguments)
        return "ok"

    def cut(self) -> str:
        stream = self.api.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": f"Write a long story about {self._topic()}."}],
            max_tokens=400,
            stream=True,
        )
        for i, _chunk in enumerate(stream):
            if i >= 4:
                break
        stream.close()  # hang up mid-reply
        return "ok"

    def completion(self) -> str:
        stream = self.api.completions.create(
            model=self.model,
            prompt=f"A few facts about {self._topic()}:",
            max_tokens=self.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        for chunk in stream:
            usage = chunk.usage or usage
            if chunk.choices:
                parts.append(chunk.choices[0].text)
        if usage is None or usage.completion_tokens < 1 or not "".join(parts):
            raise ValueError("a streamed completion without text or usage")
        return "ok"

    def bad(self) -> str:
        import openai

        cases = [
            {"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]},
            {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 9},
            {"model": self.model, "messages": []},
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "Hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}},
            },
        ]
        case = cases[self.n % len(cases)]
        try:
            self.api.chat.completions.create(max_tokens=8, **case)
        except openai.RateLimitError:
            raise
        except openai.APIStatusError as exc:
            if 400 <= exc.status_code < 500 and exc.message:
                return "refused"
            raise
        raise ValueError(f"a bad request was answered: {sorted(case)}")


def model_rss(base: str) -> tuple[float | None, float | None]:
    """The model process's RSS, and of it the host-RAM prompt cache's bytes (bounded: a cache filling is not a
    leak, so the samples show it beside the RSS)."""
    import httpx

    text = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=30).text

    def gauge(name: str) -> float | None:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    return gauge("localrun_model_process_ram_bytes"), gauge("localrun_prompt_cache_bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args()
    model = default_model()
    serve_args = [str(model), "--parallel", str(args.parallel), "--max-queue", str(args.max_queue)]
    serve_args += ["--n-ctx", "2048", "--n-threads", str(args.threads)]
    with serve(*serve_args) as base:
        import openai

        name = openai.OpenAI(base_url=base, api_key="unused").models.list().data[0].id
        start = time.monotonic()
        deadline = start + args.minutes * 60
        clients = [Client(i, base, name, deadline, args.max_tokens) for i in range(args.clients)]
        threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for t in threads:
            t.start()
        samples: list[tuple[float, float | None, float | None]] = []
        while any(t.is_alive() for t in threads):
            samples.append((round(time.monotonic() - start, 1), *model_rss(base)))
            time.sleep(10)
        for t in threads:
            t.join()
        samples.append((round(time.monotonic() - start, 1), *model_rss(base)))
        still_answers = openai.OpenAI(base_url=base, api_key="unused", max_retries=0).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    outcomes: Counter[tuple[str, str]] = Counter()
    for c in clients:
        outcomes.update(c.outcomes)
    after_first_minute = next((rss for t, rss, _ in samples if t >= 60 and rss), None)
    at_end = samples[-1][1]
    growth = at_end / after_first_minute if at_end and after_first_minute else None
    wrong = sum(n for (_, outcome), n in outcomes.items() if outcome == "wrong")
    result = {
        "machine": platform.platform(),
        "model": model.name,
        "minutes": args.minutes,
        "clients": args.clients,
        "parallel": args.parallel,
        "max_queue": args.max_queue,
        "threads": args.threads,
        "requests": sum(outcomes.values()),
        "outcomes": {kind: {o: n for (k, o), n in sorted(outcomes.items()) if k == kind} for kind in KINDS},
        "wrong": wrong,
        "wrong_examples": [w for c in clients for w in c.wrong][:20],
        "answers_after": bool(still_answers.choices[0].message.content is not None),
        "model_rss_mb": [(t, round(rss / 2**20, 1) if rss else None) for t, rss, _ in samples],
        "prompt_cache_mb": [(t, round(cache / 2**20, 1) if cache is not None else None) for t, _, cache in samples],
        "rss_after_first_minute_mb": round(after_first_minute / 2**20, 1) if after_first_minute else None,
        "rss_at_end_mb": round(at_end / 2**20, 1) if at_end else None,
        "rss_growth": growth,
        "pass": wrong == 0 and growth is not None and growth <= 1.1,
    }
    path = write_result("serve-soak", result)
    print(json.dumps({k: result[k] for k in ("requests", "outcomes", "wrong", "rss_growth", "pass")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
