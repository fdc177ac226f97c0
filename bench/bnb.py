"""bitsandbytes NF4 / INT8 on the default model, through localrun's transformers backend: footprint, tok/s, answer.

The source is SmolLM2-135M-Instruct dequantised from the default GGUF to an F32 safetensors folder (what
`localrun quantize` starts from). Four rows: NF4 and INT8, saved (`localrun quantize SRC --to NF4 -o DIR`, then
loaded from DIR) and on the fly (`--quant nf4` on SRC), plus the F32 folder itself. Each row loads the model as
`localrun chat` does, answers one question greedily, and records the memory footprint, decode tok/s and the
answer; `same_as_transformers` says whether plain transformers, loading the same weights the same way, gives
the same tokens.

Run: python bench/bnb.py [--work /tmp/localrun-bnb] [--max-tokens 32] [--out bench/results/bnb-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

QUESTION = "What is the capital of France?"


def _plain(path: Path, quant: str | None, max_tokens: int) -> list[int]:
    """Plain transformers: from_pretrained (with the bitsandbytes config when quantizing on the fly), greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localrun.backends.hf_load import quant_config

    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"quantization_config": quant_config(quant, torch.float32), "dtype": torch.float32} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, prompt.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def _ours(path: Path, quant: str, max_tokens: int) -> dict:
    """localrun's load and chat path: the streamed answer, its token ids, decode tok/s and the footprint."""
    from localrun.backends import load_backend
    from localrun.engine.chat import ChatSession
    from localrun.settings import LoadOptions, SamplingParams

    backend = load_backend(path, LoadOptions(backend="hf", quant=quant, n_ctx=1024))
    try:
        session = ChatSession(backend)
        events = list(session.send(QUESTION, SamplingParams(temperature=0.0, max_tokens=max_tokens)))
        summary = session.last
        return {
            "tokens": [t for e in events for t in e.token_ids],
            "answer": "".join(e.text for e in events),
            "footprint_bytes": backend.report.weights_bytes,
            "decode_tps": round(summary.decode_tps or 0.0, 2) if summary else None,
            "dtype": backend.report.dtype,
            "weights": backend.report.details.get("weights"),
        }
    finally:
        backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/localrun-bnb"), help="where the folders are made")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bnb-cpu.json")
    args = parser.parse_args()

    from localrun.models.catalog import default_model_path
    from localrun.quantize import run_quantize
    from localrun.quantize.to_gguf import gguf_to_hf_dir

    src = args.work / "SmolLM2-135M-Instruct-F32"
    if not src.is_dir():
        gguf_to_hf_dir(default_model_path(), src)
    saved = {m: args.work / f"{src.name}-{m}" for m in ("nf4", "int8")}
    missing = [m.upper() for m, p in saved.items() if not p.is_dir()]
    if missing:
        list(run_quantize(src, missing, out_dir=args.work))
    cases = [("F32 folder", src, "none", None)]
    cases += [(f"{m.upper()} saved", saved[m], "none", None) for m in ("nf4", "int8")]
    cases += [(f"{m.upper()} on the fly", src, m, m) for m in ("nf4", "int8")]
    rows = []
    for label, path, quant, plain_quant in cases:
        ours = _ours(path, quant, args.max_tokens)
        same = ours["tokens"] == _plain(path, plain_quant, args.max_tokens)
        rows.append({"case": label, **{k: v for k, v in ours.items() if k != "tokens"}, "same_as_transformers": same})
        print(
            f"{label:<16} {ours['footprint_bytes'] / 2**20:7.1f} MiB  {ours['decode_tps'] or 0:6.2f} tok/s  "
            f"same={same}  {ours['answer'][:60]!r}",
            flush=True,
        )
    import torch
    import transformers

    result = {
        "model": "SmolLM2-135M-Instruct (default GGUF dequantised to F32 safetensors)",
        "question": QUESTION,
        "max_tokens": args.max_tokens,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["same_as_transformers"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
