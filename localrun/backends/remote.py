"""The remote backend: a model that another engine serves over the OpenAI API (vLLM, TGI, llama-server, Ollama,
another localrun), driven through the same Backend protocol, so chat, the UI, serve and compare take it unchanged.

The remote engine tokenizes, applies its chat template and counts, so this backend is "server side":
- a prompt's ids are one handle to its text (or to its messages, for a chat), resolved when it is sent;
- each streamed piece of text is one step, and detokenize() joins pieces;
- the counts come from the engine's `usage` when the stream ends (localrun.engine.events.ServerCounts).

Timing stays in stream_generate, from the pieces' arrival. Only the round trip is measured here, once, at load.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from localrun.backends.base import LoadReport, ResolvedModel
from localrun.engine.events import ServerCounts, TokenStep
from localrun.errors import UserError
from localrun.records import fields
from localrun.settings import LoadOptions, SamplingParams

_CHAT = "\x00localrun-remote-chat\x00"  # a rendered chat: its messages as JSON, sent to /chat/completions
_KEPT = 1 << 16  # prompts and pieces kept for detokenize(): far more than any window stream_generate reads
_PROBE_S = 5.0

_OPENAI = {k: k for k in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")}
_LLAMA_EXTRAS = {k: k for k in ("top_k", "min_p", "dry_multiplier", "dry_base", "dry_allowed_length")}
_LLAMA_EXTRAS["dry_penalty_last_n"] = "dry_penalty_last_n"
# Our sampling settings by the name each engine takes them under; a setting an engine lacks is left out while
# it has its default, and refused with one sentence otherwise (never silently dropped).
ENGINE_FIELDS: dict[str, dict[str, str]] = {
    "llama.cpp": {**_OPENAI, **_LLAMA_EXTRAS, "repeat_penalty": "repeat_penalty", "ignore_eos": "ignore_eos"},
    "localrun": {
        **_OPENAI,
        **_LLAMA_EXTRAS,
        "repeat_penalty": "repetition_penalty",
        "ignore_eos": "ignore_eos",
        "think": "think",
        "think_budget": "thinking_budget",
    },
    "vLLM": {
        **_OPENAI,
        "top_k": "top_k",
        "min_p": "min_p",
        "repeat_penalty": "repetition_penalty",
        "ignore_eos": "ignore_eos",
    },
    "TGI": dict(_OPENAI),
    "Ollama": dict(_OPENAI),
    "OpenAI-compatible": dict(_OPENAI),
}
_ALWAYS = ("max_tokens", "stop", "loop_guard")  # sent as max_tokens/stop; the loop guard runs here, on the stream
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop", "eos": "stop"}


def is_remote_url(spec: str | None) -> bool:
    return re.match(r"https?://", spec or "", re.I) is not None


class RemoteBackend:
    """A model served elsewhere. load happens in __init__: the engine is found, the model checked, the round trip
    measured; every failure is one sentence (UserError) that never contains the API key."""

    name = "remote"
    supports_draft = False
    server_side = True  # localrun.engine.generate: counts and max_tokens are the engine's

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        import httpx

        options = options or LoadOptions()
        url = (model.url or options.url or "").rstrip("/")
        if not is_remote_url(url):
            raise UserError("The remote backend needs the engine's address: pass --url http://HOST:PORT/v1.")
        self.url = url if url.endswith("/v1") else url + "/v1"
        self.root = self.url[: -len("/v1")]
        self.host = urlsplit(self.url).netloc
        headers = {"Accept": "application/json"}
        key = _read_key(options.remote_api_key_file or model.api_key_file)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(connect=_PROBE_S, read=600.0, write=60.0, pool=60.0)
        self._http = httpx.Client(headers=headers, timeout=timeout, follow_redirects=False)
        self._lock = threading.Lock()
        self._kept: OrderedDict[int, str] = OrderedDict()
        self._ids = itertools.count(1)
        t0 = time.perf_counter()
        try:
            self.rtt_s, served = self._probe_models()
            self.served = [m["id"] for m in served]
            self.model = _pick_model(model.name, served, self.url)
            row = next(m for m in served if m["id"] == self.model) if served else {}
            self.engine, n_ctx, slots, memory_route = self._detect(row)
        except BaseException:
            self._http.close()
            raise
        self.memory_route = memory_route
        self.last_end: ServerCounts | None = None
        self.supports_grammar = self.engine == "llama.cpp"
        from localrun.engine.reasoning import THINK_TAGS

        self.reasoning_format = THINK_TAGS  # how _stream hands on a thinking block (engine.reasoning)
        self.fields = ENGINE_FIELDS[self.engine]
        details = {"engine": self.engine, "model": self.model, "round trip": f"{self.rtt_s * 1e3:.1f} ms"}
        self.report = LoadReport(
            backend="remote",
            device=f"{self.engine} at {self.host}",
            model_path=self.url,
            n_ctx=n_ctx or 0,
            load_s=time.perf_counter() - t0,
            details=details,
            parallel=max(slots or 8, 1),
            parallel_why="the remote engine schedules its own requests",
        )

    # -- the protocol ------------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict] | None = None, variables: dict | None = None
    ) -> str:
        """The messages as they are: the remote engine applies its own template (tools go inline, see tools.py)."""
        return _CHAT + json.dumps([{"role": m["role"], "content": m.get("content") or ""} for m in messages])

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return [self._keep(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        with self._lock:
            return "".join(self._kept.get(i, "") for i in ids)

    def generate_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Any = None
    ) -> Iterator[TokenStep]:
        if drafter is not None:
            raise UserError("Speculative decoding runs where the model is: a remote engine drafts on its own side.")
        prompt = self.detokenize(prompt_ids)
        if len(prompt_ids) != 1 or not prompt:
            raise UserError("A remote engine takes text, not token ids: send the prompt as text.")
        chat = prompt.startswith(_CHAT)
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = json.loads(prompt[len(_CHAT) :])
        else:
            body["prompt"] = prompt
        body.update(self.sampling(params))
        return (yield from self._stream("/chat/completions" if chat else "/completions", body))

    def close(self) -> None:
        self._http.close()

    # -- what is sent ------------------------------------------------------------------------------

    def sampling(self, params: SamplingParams) -> dict[str, Any]:
        """Our settings under the engine's own names; one that it lacks, set away from its default, is refused."""
        out: dict[str, Any] = {"max_tokens": params.max_tokens}
        if params.stop:
            out["stop"] = list(params.stop)
        for name, spec in fields(SamplingParams).items():
            value = getattr(params, name)
            if name in _ALWAYS or value == spec.default:  # a default is left to the engine (and its model's own)
                continue
            if name == "grammar":
                if value and not self.supports_grammar:
                    raise UserError(
                        f"The remote engine ({self.engine}) takes no grammar: response_format and forced tool calls need llama.cpp's server or a local model."
                    )
                if value:
                    out["grammar"] = value
                continue
            if name in self.fields:
                out[self.fields[name]] = {"on": True, "off": False}.get(value, value) if name == "think" else value
            else:
                raise UserError(
                    f"The remote engine ({self.engine}) does not take {name}: set it back to {spec.default} to use it."
                )
        return out

    # -- HTTP --------------------------------------------------------------------------------------

    def _keep(self, text: str) -> int:
        with self._lock:
            i = next(self._ids)
            self._kept[i] = text
            while len(self._kept) > _KEPT:
                self._kept.popitem(last=False)
            return i

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[TokenStep]:
        import httpx

        finish, usage, timings, thinking = None, None, None, False
        try:
            with self._http.stream("POST", self.url + path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise http_error(response, self.model)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = _json(data)
                    if "error" in chunk:
                        raise UserError(f"The remote engine stopped with an error: {_message(chunk)}.")
                    usage = chunk.get("usage") or usage
                    timings = chunk.get("timings") or timings
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        # a thinking model's block comes apart (reasoning_content; "reasoning" in vLLM and
                        # Ollama): it goes on in the tags the engine's parser reads (reasoning_format)
                        thought = (
                            delta.get("reasoning_content") or delta.get("reasoning") or choice.get("reasoning_content")
                        )
                        text = delta.get("content") or choice.get("text") or ""
                        if thought:
                            yield TokenStep(self._keep(("" if thinking else self.reasoning_format.open) + thought))
                            thinking = True
                        if text:
                            yield TokenStep(self._keep((self.reasoning_format.close if thinking else "") + text))
                            thinking = False
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise network_error(exc, self.url) from None
        if finish is None:
            raise UserError("The remote engine ended the stream before it said why (the connection was dropped).")
        usage = usage or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        thought = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        end = ServerCounts(
            _FINISH.get(finish, finish),
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            cached,
            timings,
            reasoning_tokens=thought,
        )
        self.last_end = end  # what the engine said of the last request that ended (for benches)
        return end

    def _get(self, path: str) -> Any:
        import httpx

        try:
            return self._http.get(self.root + path, timeout=_PROBE_S)
        except httpx.HTTPError as exc:
            raise network_error(exc, self.url) from None

    def _probe_models(self) -> tuple[float, list[dict]]:
        """The served models, and the best of three round trips to the model list (before the first request)."""
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            response = self._get("/v1/models")
            best = min(best, time.perf_counter() - t0)
            if response.status_code >= 400:
                raise http_error(response, None)
        data = _json(response.text)
        return best, [m for m in data.get("data") or () if isinstance(m, dict) and m.get("id")]

    def _detect(self, row: dict) -> tuple[str, int | None, int | None, str | None]:
        """(engine, context, slots, memory route) from the routes only one engine answers; row: the model's entry
        in the engine's model list."""
        health = self._get("/health")
        body = _json(health.text) if health.status_code == 200 else {}
        if row.get("owned_by") == "localrun" and {"slots", "queued", "busy"} <= body.keys():  # another localrun
            return "localrun", row.get("context_length"), row.get("slots") or body.get("slots"), "/metrics"
        props = self._get("/props")
        if props.status_code == 200 and "default_generation_settings" in (data := _json(props.text)):
            n_ctx = (data.get("default_generation_settings") or {}).get("n_ctx") or data.get("n_ctx")
            return "llama.cpp", n_ctx, data.get("total_slots"), None
        info = self._get("/info")
        if info.status_code == 200 and "model_id" in (data := _json(info.text)):
            return "TGI", data.get("max_total_tokens"), data.get("max_concurrent_requests"), None
        if self._get("/api/version").status_code == 200:
            return "Ollama", None, None, "/api/ps"
        version = self._get("/version")
        if version.status_code == 200 and "version" in _json(version.text):
            return "vLLM", row.get("max_model_len"), None, None
        return "OpenAI-compatible", row.get("max_model_len") or row.get("context_length"), None, None

    def read_memory(self) -> tuple[int | None, int | None]:
        """(RAM, VRAM) bytes the engine says its model takes, where it says so; (None, None) elsewhere."""
        if self.memory_route is None:
            return None, None
        try:
            response = self._get(self.memory_route)
        except UserError:
            return None, None
        if response.status_code != 200:
            return None, None
        if self.memory_route == "/api/ps":
            row = next((m for m in _json(response.text).get("models") or () if m.get("name") == self.model), None)
            if row is None:
                return None, None
            return row.get("size", 0) - row.get("size_vram", 0), row.get("size_vram") or None
        found = re.search(r"^localrun_model_process_ram_bytes (\d+(?:\.\d+)?)", response.text, re.M)
        vram = re.search(r"^localrun_model_process_vram_bytes (\d+(?:\.\d+)?)", response.text, re.M)
        return (int(float(found[1])) if found else None), (int(float(vram[1])) if vram else None)


def _read_key(path: str | None) -> str | None:
    if not path:
        return None
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise UserError(f"Cannot read the API key file {path}: {exc.strerror or exc}.") from None
    if not key:
        raise UserError(f"The API key file {path} is empty.")
    if any(c.isspace() or not c.isprintable() for c in key):  # it would go into a header, and errors quote headers
        raise UserError(f"The API key file {path} holds more than one key: put the key alone on one line.")
    return key


def _pick_model(wanted: str, served: list[dict], url: str) -> str:
    ids = [m["id"] for m in served]
    if not wanted:
        if not ids:
            raise UserError(f"The remote engine at {url} lists no models: name one with the model argument.")
        return ids[0]
    if ids and wanted not in ids:
        raise UserError(f"The remote engine at {url} has no model {wanted!r}: it serves {', '.join(ids[:8])}.")
    return wanted


def _json(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _message(body: dict) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    text = str(error or body.get("detail") or body.get("message") or "no reason given").strip().rstrip(".")
    return text[:300]


def http_error(response: Any, model: str | None) -> UserError:
    """One sentence for an HTTP error status from the remote engine (never the key: it is only in our headers)."""
    status, why = response.status_code, _message(_json(response.text))
    if status in (401, 403):
        return UserError(f"The remote engine refused the API key ({status}): check --remote-api-key-file.")
    if status == 404:
        named = f" {model!r}" if model else ""
        return UserError(f"The remote engine has no model{named} or no such route (404): {why}.")
    if status == 429:
        return UserError(f"The remote engine is busy (429): {why}; try again in a moment.")
    if status >= 500:
        return UserError(f"The remote engine failed ({status}): {why}.")
    return UserError(f"The remote engine refused the request ({status}): {why}.")


def network_error(exc: Exception, url: str) -> UserError:
    """One sentence for a connection that failed, timed out or was dropped."""
    import httpx

    host = urlsplit(url).netloc
    text = str(exc)
    if "CERTIFICATE" in text.upper() or "SSL" in text.upper() or "TLS" in text.upper():
        return UserError(
            f"The TLS handshake with {host} failed ({text[:120]}): check that it serves https with a trusted certificate."
        )
    if isinstance(exc, httpx.ConnectError):
        return UserError(f"Nothing answers at {url}: is the engine running, and is the address right?")
    if isinstance(exc, httpx.TimeoutException):
        return UserError(f"The remote engine at {host} did not answer in time ({type(exc).__name__}).")
    return UserError(f"The connection to the remote engine at {host} was dropped mid-reply ({type(exc).__name__}).")
