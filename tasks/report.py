"""The run report: PNG figures (matplotlib, Agg) and one self-contained HTML page, from plain data.

Pure: no Ray, no MLflow. ``workflows.report`` gathers the data (stage records, MLflow metric histories) and
calls these. Every figure is a :class:`matplotlib.figure.Figure` drawn on the Agg canvas (no pyplot state, no
display); the page embeds each PNG as a ``data:`` URI, so ``index.html`` alone shows everything offline,
without JavaScript.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MODEL_METRICS = (("heldout_loss", "held-out loss (nats/token)"), ("perplexity", "perplexity"),
                 ("top1_agreement", "teacher top-1 agreement"), ("ece", "ECE"),
                 ("kl_to_teacher", "KL(teacher ‖ model)"), ("size_bytes", "size (MB)"),
                 ("rss_mb", "resident MB (load + 1 forward)"), ("tokens_per_s", "tokens/s (held-out forward)"),
                 ("gen_teacher_nll", "teacher NLL of greedy answers"), ("gen_length", "greedy answer tokens"))
"""The per-model bars of :func:`models_figure`: the keys of ``tasks.evaluate.finalize``, the file size, the
resident memory and the generation metric (``registry.gate.gen_prompts``; a panel only when measured)."""


@dataclass
class Curves:
    """One training run's per-step metrics (the final run, or one Tune trial)."""

    name: str
    """Legend label (``final``, ``trial 3f2a_00001``)."""
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name → ``[(step, value), …]`` sorted by step (``loss`` every step, ``heldout_loss`` per report)."""
    stopped: bool = False
    """Stopped early by the scheduler (ASHA): drawn dashed, its last point marked ×."""
    final: bool = False
    """The run whose student was exported: drawn thick and black."""


@dataclass
class Section:
    """One part of the page: a heading, figures, a key/value or row table, a note."""

    title: str
    """Heading."""
    images: list[Path] = field(default_factory=list)
    """PNG files embedded in order."""
    rows: list[dict] = field(default_factory=list)
    """Table rows (dicts with the same keys); empty: no table."""
    note: str = ""
    """A paragraph under the heading (plain text)."""


def _new(ncols: int, nrows: int = 1, w: float = 4.2, h: float = 3.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(w * ncols, h * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def curves_figure(runs: list[Curves], path: Path, panels=(("loss", "training loss (per step)"),
                                                        ("heldout_loss", "held-out loss (step 0: init)"))) -> Path:
    """One panel per metric, one line per run; trials thin, the final run thick black, stopped trials dashed."""
    fig, axes = _new(len(panels), w=4.8, h=3.4)
    for ax, (metric, title) in zip(axes, panels):
        for r in runs:
            pts = r.series.get(metric) or []
            if not pts:
                continue
            steps, values = zip(*pts)
            style = dict(color="black", lw=2.4, zorder=3) if r.final else dict(lw=1.2, alpha=0.8)
            ax.plot(steps, values, ls="--" if r.stopped else "-", marker="." if len(pts) < 40 else None,
                    label=r.name + (" (stopped)" if r.stopped else ""), **style)
            if r.stopped:
                ax.plot(steps[-1], values[-1], marker="x", color="red", ms=9, mew=2)
        ax.set(title=title, xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return _save(fig, path)


def models_figure(rows: dict[str, dict], path: Path) -> Path:
    """One bar panel per :data:`MODEL_METRICS` entry, one bar per model (teacher, fp32, each quantized row)."""
    names = list(rows)
    metrics = [(m, t) for m, t in MODEL_METRICS if not m.startswith("gen_") or any(r.get(m) is not None
                                                                                   for r in rows.values())]
    fig, axes = _new(4, -(-len(metrics) // 4), w=3.6, h=2.9)
    for ax, (metric, title) in zip(axes, metrics):
        values = [_number(rows[n].get(metric)) for n in names]
        if metric == "size_bytes":
            values = [None if v is None else v / 2**20 for v in values]
        ax.bar(range(len(names)), [0 if v is None else v for v in values], color=_colors(len(names)))
        for i, v in enumerate(values):
            ax.annotate("n/a" if v is None else _short(v), (i, 0 if v is None else v), ha="center",
                        va="bottom", fontsize="x-small")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        ax.set_title(title, fontsize="medium")
    for ax in axes[len(metrics):]:
        ax.axis("off")
    return _save(fig, path)


def trials_figure(trials: list[dict], searched: list[str], path: Path, metric: str = "heldout_loss") -> Path:
    """One panel per searched field: its value against ``metric``. Finished trials ●, stopped ×, best ★.

    ``trials`` are ``{"params": {...}, metric: float | None, "stopped": bool, "best": bool}``; categorical
    values (strings, a few numbers) sit at evenly spaced positions labelled with the value.
    """
    fig, axes = _new(max(1, len(searched)), w=3.4)
    for ax, name in zip(axes, searched):
        raw = [t["params"].get(name) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        levels = sorted({str(v) for v in raw})
        xs = raw if numeric else [levels.index(str(v)) for v in raw]
        for t, x in zip(trials, xs):
            y = _number(t.get(metric))
            if y is None:
                continue
            marker, color = ("*", "gold") if t.get("best") else ("x", "red") if t.get("stopped") else ("o", "C0")
            edge = {} if marker == "x" else {"edgecolors": "black"}  # an × has no edge
            ax.scatter([x], [y], marker=marker, c=color, s=140 if t.get("best") else 45,
                       linewidths=1.5 if marker == "x" else 0.6, zorder=3, **edge)
        if numeric and name == "lr":
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(levels)), levels, rotation=20, fontsize="small")
        ax.set(title=name, xlabel=name, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.suptitle("Tune trials: ● finished  × stopped by ASHA  ★ best", fontsize="medium")
    return _save(fig, path)


def cache_figure(cache: dict, path: Path) -> Path:
    """Bytes per token of the cache beside dense fp16 logits over the vocabulary; teacher forwards this run."""
    fig, (left, right) = _new(2, w=3.6)
    bars = {"this cache": _number(cache.get("bytes_per_token"))}
    if cache.get("vocab_size"):
        bars["dense fp16"] = 2.0 * cache["vocab_size"]
    left.bar(list(bars), [v or 0 for v in bars.values()], color=["C0", "C7"][:len(bars)])
    left.set_yscale("log")
    for i, v in enumerate(bars.values()):
        left.annotate("n/a" if v is None else _short(v), (i, v or 1), ha="center", va="bottom", fontsize="small")
    left.set_title(f"cache bytes/token ({cache.get('format', '?')})", fontsize="medium")
    counts = {"teacher forwards\n(this run)": cache.get("teacher_forwards"), "shards total": cache.get("shards_total"),
              "shards computed": cache.get("shards_computed")}
    right.bar(list(counts), [_number(v) or 0 for v in counts.values()], color="C1")
    for i, v in enumerate(counts.values()):
        right.annotate("n/a" if v is None else str(v), (i, _number(v) or 0), ha="center", va="bottom")
    right.tick_params(axis="x", labelsize="small")
    right.set_title(f"teacher passes ({cache.get('tokens', '?')} tokens)", fontsize="medium")
    return _save(fig, path)


def render_html(title: str, sections: list[Section], subtitle: str = "") -> str:
    """The page: every section's figures inlined as ``data:image/png`` URIs, tables as plain HTML."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}"
             "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}table{border-collapse:collapse;"
             "font-size:.9em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>",
             f"<h1>{_e(title)}</h1><p>{_e(subtitle)}</p>"]
    for s in sections:
        parts.append(f"<h2>{_e(s.title)}</h2>")
        if s.note:
            parts.append(f"<p>{_e(s.note)}</p>")
        for img in s.images:
            data = base64.b64encode(Path(img).read_bytes()).decode()
            parts.append(f"<img alt='{_e(Path(img).stem)}' src='data:image/png;base64,{data}'>")
        if s.rows:
            parts.append(_table(s.rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_e(_cell(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return _short(v)
    return str(v)


def _short(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def _e(text) -> str:
    return html.escape(str(text), quote=True)
