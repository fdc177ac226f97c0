"""The engine: what turns a request into a stream of GenerationEvents, in the REPL's process or the model process.

- `messages`: the typed requests (LoadRequest, GenerateRequest) and replies that cross the worker's pipe;
- `jobs`: a GenerateRequest run on a backend, the one place that builds the prompt;
- `generate`: stream_generate, the one place that times, detokenises and matches stop strings;
- `scheduler`: the slots of one llama.cpp context, decoded together (continuous batching);
- `speculative`: drafters and the adaptive draft length;
- `worker`, `worker_child`: the model process and its client in the parent;
- `chat`, `chat_template`, `tools`, `structured`, `schema_gbnf`, `penalties`, `repetition`: conversations,
  templates, tool calls, grammars and the sampling rules the engine applies.
"""
