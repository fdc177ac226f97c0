"""Models: where they come from and whether they fit.

- `catalog`: the default model, paths, catalog names (the manifests in models/) and the local store;
- `hub`: Hugging Face search and download; `store`: what is on disk, and removing it;
- `gguf_header`, `gguf_info`: a GGUF file's header, read and checked without its weights;
- `fit`: the memory a model takes, before it loads; `endpoints`: remote engines saved by name.
"""
