"""The README's first command, as a new user runs it: `localrun chat -p "What is the capital of France?"`,
20 times, each a separate process with a fresh seed and the default model's recommended settings.

A run passes when the reply names Paris, ends on its own (the stats line says no "stopped:", which it says for
the token limit and the loop guard) and does not loop (localrun.engine.repetition.find_loop on the reply's tokens).
Writes bench/results/first-command.json. A pass-rate bench, not a timing one.

Run: python bench/first_command.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first-command.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from localrun.backends.llama_ctx import open_model
    from localrun.engine.repetition import find_loop
    from localrun.models.catalog import default_model_path

    vocab = open_model(str(default_model_path()), vocab_only=True)

    def text_of(token: int) -> str:
        return vocab.detokenize([token]).decode("utf-8", "replace")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for i in range(args.runs):
        done = subprocess.run(
            [sys.executable, "-m", "localrun.cli", "chat", "-p", PROMPT], capture_output=True, text=True, env=env
        )
        reply = done.stdout.strip()
        ids = vocab.tokenize(reply.encode(), False, False)
        checks = {
            "exit_0": done.returncode == 0,
            "paris": re.search(r"\bparis\b", reply.lower()) is not None,
            "ends": "stopped:" not in done.stderr,
            "no_loop": find_loop(ids, text_of) is None,
        }
        runs.append(
            {"run": i, "pass": all(checks.values()), **checks, "stats": done.stderr.strip()[-300:], "reply": reply}
        )
        print(f"run {i:2}: {'pass' if all(checks.values()) else 'FAIL'} {checks} {reply[:90]!r}", flush=True)
    passed = sum(r["pass"] for r in runs)
    print(f"{passed}/{len(runs)} runs pass")
    record = {
        "command": f'localrun chat -p "{PROMPT}"',
        "passed": passed,
        "runs": runs,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
