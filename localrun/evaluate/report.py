"""The comparison's outputs: a terminal table, JSON, CSV and PNG charts (matplotlib, imported lazily)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localrun.evaluate.compare import ROW_FIELDS, CompareRow
from localrun.models.catalog import write_atomic

_COLUMNS = (
    ("variant", 8),
    ("MiB", 7),
    ("bpw", 5),
    ("load s", 6),
    ("RAM MB", 7),
    ("TTFT ms", 7),
    ("pp t/s", 7),
    ("tg t/s", 7),
    ("PPL", 7),
    ("ΔPPL %", 7),
    ("KLD", 7),
    ("KLD p99", 7),
    ("top-1 %", 7),
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def label_width(labels: Sequence[str]) -> int:
    """The variant column's width: the longest label (a remote engine's is long), at least the default."""
    return max([_COLUMNS[0][1], *(len(label) for label in labels)])


def header(width: int = _COLUMNS[0][1]) -> str:
    cells = [f"{_COLUMNS[0][0]:<{width}}"] + [f"{name:>{w}}" for name, w in _COLUMNS[1:]]
    return " ".join(cells) + "  answer"


def _size_mib(row: CompareRow) -> float | None:
    """None for a remote engine: its weights are not ours to measure."""
    return row.size_bytes / 2**20 if row.size_bytes else None


def format_row(row: CompareRow, *, answer_chars: int = 60, width: int = _COLUMNS[0][1]) -> str:
    """One line of the terminal table; an error row shows its sentence instead of figures."""
    if row.error:
        return f"{row.label:<{width}} error: {row.error}"
    cells = [
        _num(_size_mib(row), ".1f"),
        _num(row.bits_per_weight, ".2f"),
        _num(row.load_s, ".2f"),
        _num(row.peak_ram_bytes / 1e6 if row.peak_ram_bytes else None, ".0f"),
        _num(row.ttft_s * 1000 if row.ttft_s is not None else None, ".0f"),
        _num(row.prompt_tps, ".0f"),
        _num(row.decode_tps, ".1f"),
        _num(row.ppl, ".3f"),
        _num(row.delta_ppl_pct, "+.2f"),
        _num(row.kld_mean, ".4f"),
        _num(row.kld_p99, ".3f"),
        _num(row.top1_agreement_pct, ".1f"),
    ]
    line = f"{row.label:<{width}} " + " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, _COLUMNS[1:], strict=True))
    answer = " ".join(row.answer.split())
    return f"{line}  {answer[:answer_chars]}{'…' if len(answer) > answer_chars else ''}"


_ARENA_COLUMNS = (("load s", 6), ("RAM MB", 7), ("TTFT ms", 7), ("pp t/s", 7), ("tg t/s", 7))


def format_arena_table(rows: Sequence[CompareRow]) -> str:
    """The arena's table, printed after the answers: speed and memory per variant, and where it ran.
    Memory a remote engine does not report is "n/a"."""
    width = label_width([r.label for r in rows])
    lines = [" ".join([f"{'variant':<{width}}", *(f"{n:>{w}}" for n, w in _ARENA_COLUMNS)]) + "  device"]
    for r in rows:
        if r.error:
            lines.append(f"{r.label:<{width}} error: {r.error}")
            continue
        ram = "n/a" if r.kind == "remote" and not r.peak_ram_bytes else _num((r.peak_ram_bytes or 0) / 1e6, ".0f")
        cells = [
            _num(r.load_s, ".2f"),
            ram,
            _num(r.ttft_s * 1000 if r.ttft_s is not None else None, ".0f"),
            _num(r.prompt_tps, ".0f"),
            _num(r.decode_tps, ".1f"),
        ]
        row = " ".join([f"{r.label:<{width}}", *(f"{c:>{w}}" for c, (_, w) in zip(cells, _ARENA_COLUMNS, strict=True))])
        lines.append(f"{row}  {r.device}")
    return "\n".join(lines)


def _charted(rows: Sequence[CompareRow], metric: str) -> list[CompareRow]:
    """The rows a size chart can place: finished, with the metric, and with a size (no remote engine)."""
    return [r for r in rows if not r.error and r.size_bytes > 0 and getattr(r, metric) is not None]


def pareto_front(rows: Sequence[CompareRow], metric: str = "kld_mean") -> list[CompareRow]:
    """Rows no other row beats on both size and `metric` (lower is better for both)."""
    ok = _charted(rows, metric)
    front = []
    for r in ok:
        value = getattr(r, metric)
        dominated = any(
            o is not r
            and o.size_bytes <= r.size_bytes
            and getattr(o, metric) <= value
            and (o.size_bytes < r.size_bytes or getattr(o, metric) < value)
            for o in ok
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.size_bytes)


def to_json(rows: Sequence[CompareRow], meta: dict[str, Any]) -> str:
    return json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2, ensure_ascii=False)


def to_csv(rows: Sequence[CompareRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.as_dict())
    return buf.getvalue()


def _chart(rows: Sequence[CompareRow], metric: str, ylabel: str, title: str, *, lower_better: bool) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ok = _charted(rows, metric)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    xs = [r.size_bytes / 2**20 for r in ok]
    ys = [getattr(r, metric) for r in ok]
    ax.scatter(xs, ys, color="#4477aa", zorder=3)
    for r, x, y in zip(ok, xs, ys, strict=True):
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if lower_better:
        front = pareto_front(ok, metric)
    else:  # higher is better: flip the metric's sign to reuse the same front
        front = [
            r
            for r in ok
            if not any(o.size_bytes <= r.size_bytes and getattr(o, metric) > getattr(r, metric) for o in ok)
        ]
        front.sort(key=lambda r: r.size_bytes)
    if front:
        ax.plot(
            [r.size_bytes / 2**20 for r in front],
            [getattr(r, metric) for r in front],
            color="#cc6677",
            linestyle="--",
            marker="o",
            zorder=2,
            label="Pareto front",
        )
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def quality_chart(rows: Sequence[CompareRow]) -> bytes:
    """KL-divergence against size, Pareto front (smaller and closer to the reference) marked."""
    return _chart(rows, "kld_mean", "mean KL-divergence vs F16 (lower is better)", "Quality vs size", lower_better=True)


def speed_chart(rows: Sequence[CompareRow]) -> bytes:
    """Generation speed against size, Pareto front (smaller and faster) marked."""
    return _chart(rows, "decode_tps", "generation tokens/s (higher is better)", "Speed vs size", lower_better=False)


def write_outputs(out_dir: str | Path, rows: Sequence[CompareRow], meta: dict[str, Any]) -> dict[str, Path]:
    """compare.json, compare.csv, quality_vs_size.png and speed_vs_size.png, each written atomically."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": (out / "compare.json", (to_json(rows, meta) + "\n").encode()),
        "csv": (out / "compare.csv", to_csv(rows).encode()),
        "quality_chart": (out / "quality_vs_size.png", quality_chart(rows)),
        "speed_chart": (out / "speed_vs_size.png", speed_chart(rows)),
    }
    for path, data in files.values():
        write_atomic(path, data)
    return {name: path for name, (path, _) in files.items()}
