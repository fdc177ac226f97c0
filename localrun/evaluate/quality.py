"""Perplexity, KL-divergence and top-1 agreement, computed the way `llama-perplexity` does.

The text is tokenized once (by the reference, with BOS when its vocabulary asks for one) and cut into
non-overlapping windows of `n_ctx` tokens; the first token of each window is replaced by BOS, and only
the second half of each window is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens
at n_ctx/2+1 .. n_ctx-1, so every scored token has at least n_ctx/2 tokens of context. Every variant is
fed the same ids; a variant that tokenizes the text differently (another vocabulary) is refused.

The reference's distributions are kept in a compact form (`Reference`): for every scored position the
top-k log-probabilities (k=1024 of SmolLM2's 49,152 tokens by default, about 8 kB a position) and, implicitly,
the tail mass 1 - sum(top-k). The KL-divergence of a variant is computed over the k reference tokens plus one
"tail" bucket. Grouping the tail never raises KL (log-sum inequality), so the compact value is a lower bound
of the exact one, short by exactly p_tail * KL(P_tail || Q_tail) per position (P_tail, Q_tail: the two
distributions renormalised over the tail). `Reference.tail_mass` reports p_tail. Measured on SmolLM2-135M
(Q4_0 against Q4_1, bundled text, 256-token windows): exact mean KLD 0.2597, compact 0.2542 at k=1024 (-2.1 %),
0.2441 at k=256 (-6.0 %); tests/test_evaluate.py checks the bound and a 5 % gap against the exact value.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from localrun.errors import UserError

DEFAULT_N_CTX = 512
DEFAULT_TOP_K = 1024
_ROWS = 64  # log-softmax in blocks of rows, so a window never holds more than a few vocab-sized float64 rows


def bundled_text_path() -> Path:
    """The bundled public-domain evaluation text (see localrun/data/README.md)."""
    return Path(str(resources.files("localrun") / "data" / "alice.txt"))


def read_text(path: str | Path | None) -> str:
    """The evaluation text: the user's file, or the bundled text when `path` is None."""
    path = Path(path).expanduser() if path else bundled_text_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"The text file {path} does not exist: pass an existing UTF-8 text file to --text.") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"{path} is not a UTF-8 text file: pass a plain text file to --text.") from None
    if not text.strip():
        raise UserError(f"{path} is empty: pass a text of a few thousand tokens to --text.")
    return text


class Scorer(Protocol):
    """A loaded model that returns raw logits for the scored positions of one window."""

    n_vocab: int
    add_bos: bool
    bos_id: int

    def tokenize(self, text: str) -> list[int]:
        """The text's ids without any special token."""
        ...

    def window_logits(self, ids: Sequence[int], first: int) -> np.ndarray:
        """float32 logits [len(ids) - 1 - first, n_vocab] for positions first .. len(ids) - 2."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EvalTokens:
    """The token ids every variant is fed, and how they are cut into windows."""

    ids: np.ndarray  # int32, BOS first when the reference's vocabulary adds one
    text_ids: np.ndarray  # the same without BOS: what every variant's tokenizer must reproduce
    n_ctx: int
    bos_id: int
    add_bos: bool

    @property
    def n_windows(self) -> int:
        return len(self.ids) // self.n_ctx

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        return self.n_windows * (self.n_ctx - 1 - self.first)

    def windows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(window ids as fed, with BOS first when add_bos; the scored target ids) per window."""
        for i in range(self.n_windows):
            window = self.ids[i * self.n_ctx : (i + 1) * self.n_ctx].copy()
            targets = window[self.first + 1 :].copy()
            if self.add_bos:
                window[0] = self.bos_id
            yield window, targets


def tokenize_once(scorer: Scorer, text: str, *, n_ctx: int = DEFAULT_N_CTX) -> EvalTokens:
    """Tokenize with the reference; refuse a text shorter than two windows, as llama-perplexity does."""
    if n_ctx < 4:
        raise UserError(f"The evaluation context must be at least 4 tokens, not {n_ctx}.")
    text_ids = np.asarray(scorer.tokenize(text), dtype=np.int32)
    ids = np.concatenate([[scorer.bos_id], text_ids]).astype(np.int32) if scorer.add_bos else text_ids
    if len(ids) < 2 * n_ctx:
        raise UserError(
            f"The text is {len(ids)} tokens, fewer than two windows of {n_ctx}: "
            f"pass a longer text or a smaller context (at least {2 * n_ctx} tokens)."
        )
    return EvalTokens(ids, text_ids, n_ctx, scorer.bos_id, scorer.add_bos)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass(frozen=True)
class Reference:
    """The reference's distributions at every scored position, compactly: top-k log-probs (descending)."""

    tokens: EvalTokens
    n_vocab: int
    top_ids: np.ndarray  # int32 [n_scored, k]
    top_logprobs: np.ndarray  # float32 [n_scored, k]
    nll: np.ndarray  # float64 [n_scored]: the reference's own -log p(target), exact

    @property
    def tail_mass(self) -> np.ndarray:
        return np.clip(1.0 - np.exp(self.top_logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    def save(self, path: str | Path) -> Path:
        """Write as .npz (about 8 kB per scored position at k=1024)."""
        path = Path(path)
        t = self.tokens
        np.savez(
            path,
            ids=t.ids,
            text_ids=t.text_ids,
            meta=np.array([t.n_ctx, t.bos_id, int(t.add_bos), self.n_vocab], dtype=np.int64),
            top_ids=self.top_ids,
            top_logprobs=self.top_logprobs,
            nll=self.nll,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        with np.load(Path(path)) as z:
            n_ctx, bos_id, add_bos, n_vocab = (int(v) for v in z["meta"])
            tokens = EvalTokens(z["ids"], z["text_ids"], n_ctx, bos_id, bool(add_bos))
            return cls(tokens, n_vocab, z["top_ids"], z["top_logprobs"], z["nll"])


def _blocks(logits: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    for start in range(0, len(logits), _ROWS):
        rows = slice(start, min(start + _ROWS, len(logits)))
        yield rows, log_softmax(logits[rows])


def build_reference(scorer: Scorer, tokens: EvalTokens, *, top_k: int = DEFAULT_TOP_K) -> Reference:
    """Run the reference once over every window and keep its top-k log-probs per scored position."""
    k = min(top_k, scorer.n_vocab)
    top_ids, top_lp, nll = [], [], []
    for window, targets in tokens.windows():
        logits = scorer.window_logits(window, tokens.first)
        for rows, lp in _blocks(logits):
            idx = np.argpartition(-lp, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(lp, idx, axis=1)
            order = np.argsort(-vals, axis=1, kind="stable")
            top_ids.append(np.take_along_axis(idx, order, axis=1).astype(np.int32))
            top_lp.append(np.take_along_axis(vals, order, axis=1).astype(np.float32))
            nll.append(-lp[np.arange(len(lp)), targets[rows]])
    return Reference(tokens, scorer.n_vocab, np.concatenate(top_ids), np.concatenate(top_lp), np.concatenate(nll))


@dataclass(frozen=True, slots=True)
class Quality:
    """One variant's quality against a reference."""

    ppl: float
    ppl_stderr: float
    n_scored: int
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement_pct: float
    delta_ppl_pct: float
    ref_ppl: float

    def as_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.__slots__}


def check_vocabulary(scorer: Scorer, ref: Reference, text: str, *, name: str = "the variant") -> None:
    """Refuse a variant whose vocabulary differs from the reference's (the ids would mean other tokens)."""
    if scorer.n_vocab != ref.n_vocab:
        raise UserError(
            f"{name} has a vocabulary of {scorer.n_vocab} tokens, the reference {ref.n_vocab}: "
            "compare only variants of the same model."
        )
    if not np.array_equal(np.asarray(scorer.tokenize(text), dtype=np.int32), ref.tokens.text_ids):
        raise UserError(
            f"{name} tokenizes the text differently from the reference: compare only variants of the same model."
        )


def _kld_rows(lp: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray) -> np.ndarray:
    """KL(ref || variant) per row over the reference's top-k tokens plus one tail bucket."""
    ref_lp = top_lp.astype(np.float64)
    ref_p = np.exp(ref_lp)
    var_lp = np.take_along_axis(lp, top_ids, axis=1)
    kld = (ref_p * (ref_lp - var_lp)).sum(axis=1)
    p_tail = np.clip(1.0 - ref_p.sum(axis=1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(var_lp).sum(axis=1), 1e-300, 1.0)
    has_tail = p_tail > 1e-12
    kld[has_tail] += p_tail[has_tail] * (np.log(p_tail[has_tail]) - np.log(q_tail[has_tail]))
    return kld


def evaluate(scorer: Scorer, ref: Reference) -> Quality:
    """Perplexity of `scorer` on the reference's ids, and its KLD / top-1 agreement against the reference."""
    tokens = ref.tokens
    nll_parts, kld_parts, same_parts = [], [], []
    pos = 0
    for window, targets in tokens.windows():
        logits = scorer.window_logits(window, tokens.first)
        for rows, lp in _blocks(logits):
            n = len(lp)
            ref_rows = slice(pos, pos + n)
            nll_parts.append(-lp[np.arange(n), targets[rows]])
            kld_parts.append(_kld_rows(lp, ref.top_ids[ref_rows], ref.top_logprobs[ref_rows]))
            same_parts.append(lp.argmax(axis=1) == ref.top_ids[ref_rows, 0])
            pos += n
    return summarise(np.concatenate(nll_parts), np.concatenate(kld_parts), np.concatenate(same_parts), ref.ppl)


def summarise(nll: np.ndarray, kld: np.ndarray, same_top: np.ndarray, ref_ppl: float) -> Quality:
    """The reported statistics, with llama-perplexity's standard error of the PPL estimate."""
    n = len(nll)
    mean = float(nll.mean())
    ppl = float(np.exp(mean))
    stderr = float(np.sqrt(max(float((nll**2).mean()) - mean * mean, 0.0) / max(n - 1, 1))) * ppl
    return Quality(
        ppl=ppl,
        ppl_stderr=stderr,
        n_scored=n,
        kld_mean=float(kld.mean()),
        kld_median=float(np.median(kld)),
        kld_p99=float(np.percentile(kld, 99)),
        kld_max=float(kld.max()),
        top1_agreement_pct=100.0 * float(same_top.mean()),
        delta_ppl_pct=100.0 * (ppl / ref_ppl - 1.0),
        ref_ppl=ref_ppl,
    )


def perplexity(scorer: Scorer, tokens: EvalTokens) -> tuple[float, float]:
    """(PPL, its standard error) of a model on its windows, without a reference."""
    nll = []
    for window, targets in tokens.windows():
        logits = scorer.window_logits(window, tokens.first)
        for rows, lp in _blocks(logits):
            nll.append(-lp[np.arange(len(lp)), targets[rows]])
    q = summarise(np.concatenate(nll), np.zeros(1), np.ones(1, dtype=bool), 1.0)
    return q.ppl, q.ppl_stderr


# -- scorers --------------------------------------------------------------------------------------


class LlamaCppScorer:
    """A GGUF on the same llama.cpp handles the backend uses (llama_ctx), offloaded by the backend's own rule:
    one decode per window, logits only for the scored half."""

    def __init__(self, path: str | Path, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None) -> None:
        from localrun.backends.llama_ctx import LlamaContext, llama_cpp, open_model
        from localrun.backends.llamacpp import gpu_layers
        from localrun.hardware import physical_cores
        from localrun.models.gguf_info import inspect_gguf
        from localrun.settings import LoadOptions

        path = Path(path)
        inspect_gguf(path)  # a corrupt file is a UserError here, not a crash in llama.cpp
        self._lib = llama_cpp
        try:
            self._model = open_model(str(path), n_gpu_layers=gpu_layers(path, LoadOptions(), n_ctx))
        except ValueError:
            raise UserError(f"llama.cpp could not load {path.name}: check that it is a complete GGUF file.") from None
        try:
            self._ctx = LlamaContext(self._model, n_ctx=n_ctx, n_threads=n_threads or physical_cores(), n_batch=n_ctx)
        except ValueError:
            self._model.close()
            raise UserError(f"llama.cpp could not make a context of {n_ctx} tokens for {path.name}.") from None
        self.n_vocab = int(self._ctx.n_vocab)
        self.add_bos = bool(self._model.add_bos_token())
        self.bos_id = int(self._model.token_bos())
        self._batch = self._ctx.new_batch(n_ctx)
        self._n_ctx = n_ctx

    def tokenize(self, text: str) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def window_logits(self, ids: Sequence[int], first: int) -> np.ndarray:
        lib, ctx, batch, n = self._lib, self._ctx, self._batch, len(ids)
        if n > self._n_ctx:
            raise ValueError(f"window of {n} tokens in a context of {self._n_ctx}")
        from localrun.backends.llama_ctx import put_tokens

        lib.llama_memory_clear(ctx.mem, True)
        batch.n_tokens = put_tokens(batch, 0, [int(t) for t in ids], pos0=0, logits_from=first)
        rc = lib.llama_decode(ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        ptr = lib.llama_get_logits(ctx.ctx)
        rows = n - first
        out = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, self.n_vocab))
        return out[: rows - 1].copy()  # the last position predicts past the window

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()  # frees its batches too
            self._model.close()
            self._ctx = None


class HFScorer:
    """A transformers model (float or bitsandbytes NF4/INT8, saved or quantized at load) on one device."""

    def __init__(self, path: str | Path, *, quant: str = "none", device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json).")
        from localrun.backends.hf_load import saved_quant

        kwargs: dict = {"device_map": device}
        saved = saved_quant(path)  # a saved NF4/INT8 folder loads with its own quantization_config and dtype
        if saved is not None and quant not in ("none", saved):
            raise UserError(f"{path.name} is already quantized with bitsandbytes {saved.upper()}, not {quant.upper()}.")
        if saved is None and quant != "none":
            from localrun.quantize.bnb import bnb_config

            kwargs["quantization_config"] = bnb_config(quant, compute_dtype="float32")
        if saved is None and quant == "none":
            kwargs["dtype"] = torch.float32
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        bos = self.tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else -1
        self.add_bos = bool(getattr(self.tokenizer, "add_bos_token", False)) and bos is not None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def window_logits(self, ids: Sequence[int], first: int) -> np.ndarray:
        torch = self._torch
        input_ids = torch.tensor([list(map(int, ids))], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, logits_to_keep=len(ids) - first)
        return out.logits[0, :-1].float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def open_scorer(path: str | Path, *, n_ctx: int = DEFAULT_N_CTX, quant: str = "none") -> Scorer:
    """A scorer for a .gguf file (llama.cpp) or a Hugging Face directory (transformers)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return HFScorer(path, quant=quant)
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a .gguf file or a Hugging Face model directory.")
    return LlamaCppScorer(path, n_ctx=n_ctx)
