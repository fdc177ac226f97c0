"""llama-cpp-python's C bindings without the rest of the package, for a faster start.

`import llama_cpp` runs the package's __init__, which also imports its high-level `Llama` class, the chat
formats, the grammar converter and their dependencies: about a tenth of a second that `localrun chat` never
uses (it drives the C API itself). `llama_cpp()` puts a light package module in its place that holds only
the bindings (`llama_cpp.llama_cpp`); any other name asked of it (`Llama`, a submodule's export), or dir(),
loads the rest of the package into that same module first, so code that imports `llama_cpp` later sees the
whole of it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType


def llama_cpp() -> ModuleType:
    """The `llama_cpp` package module, with its C bindings loaded (the rest on first use)."""
    loaded = sys.modules.get("llama_cpp")
    if loaded is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            import llama_cpp as loaded  # not a regular package: the plain import raises the usual error
        else:
            loaded = _light_package(spec)
    if "llama_cpp.llama_cpp" not in sys.modules:
        importlib.import_module("llama_cpp.llama_cpp")
    return loaded


def _light_package(spec: importlib.machinery.ModuleSpec) -> ModuleType:
    pkg = importlib.util.module_from_spec(spec)
    init = Path(spec.origin or "")
    found = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text()) if init.is_file() else None
    pkg.__version__ = found.group(1) if found else "?"
    folder = Path(next(iter(spec.submodule_search_locations)))
    full = False

    def load_full() -> None:
        """The package's own __init__, run once into this same module."""
        nonlocal full
        if not full:
            full = True
            spec.loader.exec_module(pkg)

    def __getattr__(name: str):  # PEP 562: names the light module lacks
        if name.startswith("__"):
            raise AttributeError(name)
        bindings = sys.modules.get("llama_cpp.llama_cpp")
        if bindings is not None and hasattr(bindings, name):
            return getattr(bindings, name)
        if (folder / f"{name}.py").is_file():  # `from llama_cpp import _internals`: just that submodule
            return importlib.import_module(f"llama_cpp.{name}")
        load_full()
        if name in pkg.__dict__:
            return pkg.__dict__[name]
        raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}")

    def __dir__() -> list[str]:  # dir() lists the whole package, as after a plain import
        load_full()
        return sorted(pkg.__dict__)

    pkg.__getattr__ = __getattr__
    pkg.__dir__ = __dir__
    sys.modules["llama_cpp"] = pkg
    return pkg
