"""Named remote engines: `localrun endpoints add gpu-box http://gpu-box:8000/v1` saves one in
$LOCALRUN_HOME/endpoints.json, and then `gpu-box:qwen3-32b` names that engine's model anywhere a model is named
(chat, serve, the UI, bench, compare). A URL works too: `http://host:8000/v1` (its first model) or
`http://host:8000/v1#MODEL`.

Only the key file's path is saved, never a key.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from localrun.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A remote engine's OpenAI API address, and the file that holds its key (if it takes one)."""

    name: str
    url: str
    api_key_file: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """One model on a remote engine: what `NAME:MODEL` or a URL resolves to (model blank: the engine's first)."""

    url: str
    model: str = ""
    api_key_file: str | None = None
    endpoint: str | None = None

    @property
    def label(self) -> str:
        where = self.endpoint or self.url
        return f"{where}:{self.model}" if self.model else where


def endpoints_path() -> Path:
    from localrun.models.catalog import localrun_home

    return localrun_home() / "endpoints.json"


def load_endpoints() -> dict[str, Endpoint]:
    """The saved endpoints by name; none when the file does not exist. A damaged file is one sentence."""
    path = endpoints_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        data = json.loads(text)
        rows = data["endpoints"]
        found = {r["name"]: Endpoint(r["name"], r["url"], r.get("api_key_file")) for r in rows}
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a localrun endpoints file: fix it or remove it.") from None
    return found


def _save(endpoints: dict[str, Endpoint]) -> None:
    from localrun.models.catalog import write_atomic

    rows = [asdict(e) for e in sorted(endpoints.values(), key=lambda e: e.name)]
    write_atomic(endpoints_path(), (json.dumps({"endpoints": rows}, indent=2) + "\n").encode())


def normalise_url(url: str) -> str:
    """The engine's API root ending in /v1; anything that is not an http(s) address is one sentence."""
    from localrun.backends.remote import is_remote_url

    url = url.strip().rstrip("/")
    if not is_remote_url(url) or "#" in url:
        raise UserError(f"{url!r} is not an engine address: give it as http://HOST:PORT/v1 (or https://).")
    return url if url.endswith("/v1") else url + "/v1"


def add_endpoint(name: str, url: str, api_key_file: str | None = None) -> Endpoint:
    """Save (or replace) an endpoint. The name must not shadow a catalog model, so `NAME:X` stays unambiguous."""
    from localrun.models.catalog import catalog

    if not _NAME.fullmatch(name):
        raise UserError(f"{name!r} is not an endpoint name: use letters, digits, '.', '_' and '-' (e.g. gpu-box).")
    if any(m.name == name.lower() for m in catalog()):
        raise UserError(f"{name!r} is a model in the catalog: give the endpoint another name.")
    if api_key_file:
        key_path = Path(api_key_file).expanduser()
        if not key_path.is_file():
            raise UserError(f"The API key file {api_key_file} does not exist.")
        api_key_file = str(key_path.resolve())
    endpoints = load_endpoints()
    endpoint = Endpoint(name, normalise_url(url), api_key_file)
    endpoints[name] = endpoint
    _save(endpoints)
    return endpoint


def remove_endpoint(name: str) -> None:
    endpoints = load_endpoints()
    if endpoints.pop(name, None) is None:
        raise UserError(f"No endpoint is named {name!r}: `localrun endpoints list` shows them.")
    _save(endpoints)


def remote_target(spec: str | None) -> RemoteTarget | None:
    """`NAME[:MODEL]` for a saved endpoint, or `URL[#MODEL]`; None when spec names neither (a local model)."""
    from localrun.backends.remote import is_remote_url

    if not spec:
        return None
    if is_remote_url(spec):
        url, _, model = spec.partition("#")
        return RemoteTarget(normalise_url(url), model.strip())
    name, _, model = spec.partition(":")
    if not _NAME.fullmatch(name) or Path(spec).expanduser().exists():
        return None
    try:
        endpoint = load_endpoints().get(name)
    except UserError:  # a damaged file must not stop local models from loading; `endpoints list` says what is wrong
        return None
    if endpoint is None:
        return None
    return RemoteTarget(endpoint.url, model.strip(), endpoint.api_key_file, endpoint.name)
