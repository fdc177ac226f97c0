"""How good a model is, and how its variants compare: `quality` (perplexity, KL-divergence and top-1 agreement,
as llama-perplexity computes them), `compare` (quantization levels and remote engines side by side) and
`report` (the comparison's table, JSON, CSV and charts)."""
