"""localrun: run LLMs locally and see exactly how fast they run and how much memory they take.

The public API used by the CLI and the UI lives here; heavy libraries (torch, transformers,
llama_cpp, gradio) are imported lazily inside the functions that need them.
"""

from localrun.engine.events import GenerationEvent, GenerationSummary, TokenStep
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "GenerationEvent",
    "GenerationSummary",
    "LoadOptions",
    "SamplingParams",
    "TokenStep",
    "UserError",
    "__version__",
]
