"""The benchmark report: FD-vs-NFE and FD-vs-time plots, and one self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from fewstep.io import write_text


def _series(results: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[float, float, float]]]:
    """method line -> [(nfe, wall_seconds_per_sample, metric)] sorted by NFE (a student's step counts make one
    line); the teacher reference apart."""
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for r in results:
        if r.get(metric) is None or r["method"] not in ("fewstep", "diffusers", "student"):
            continue
        lines[f"{r['method']}:{r['name']}"].append((r["nfe"], r["wall_seconds"] / r["n"], r[metric]))
    return {k: sorted(v) for k, v in lines.items()}


def plot(results: list[dict[str, Any]], metric: str, x: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, pts in _series(results, metric).items():
        xs = [p[0] if x == "nfe" else p[1] * 1000 for p in pts]
        student = name.startswith("student")
        ax.plot(xs, [p[2] for p in pts], marker="*" if student else "o", ms=9 if student else 4,
                lw=2 if student else 1.5, ls="--" if name.startswith("diffusers") else "-", label=name,
                zorder=4 if student else 2)
    for r in results:
        if r["method"] == "teacher-best" and r.get(metric) is not None:
            xv = r["nfe"] if x == "nfe" else r["wall_seconds"] / r["n"] * 1000
            ax.scatter([xv], [r[metric]], marker="D", s=60, zorder=5, label=r["label"])
    floor = next((r["floor"].get(metric) for r in results if r.get("floor", {}).get(metric) is not None), None)
    if floor is not None:
        ax.axhline(floor, color="gray", ls=":", lw=1, label="floor (train vs test)")
    ax.set_xscale("log", base=2 if x == "nfe" else 10)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)" if x == "nfe" else "wall ms per sample (this machine)")
    ax.set_ylabel(metric.upper() + " (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(curves: dict[str, list[tuple[float, float]]], metric: str) -> bytes:
    """Each student's quality logged while it trained (train split, ``eval_every``) against its distillation time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, pts in sorted(curves.items()):
        ax.plot([p[0] / 60 for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distillation time (minutes, this machine)")
    ax.set_ylabel(f"{metric.upper()} on the train split while training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _feature_facts(results: list[dict]) -> str:
    """The feature network's quality: a classifier's test accuracy, or an autoencoder's (unlabelled data) test
    reconstruction error."""
    acc = next((r.get("feature_accuracy") for r in results if r.get("feature_accuracy") is not None), None)
    err = next((r.get("feature_error") for r in results if r.get("feature_error") is not None), None)
    if acc is None and err is not None:
        return f"features from an autoencoder (unlabelled data), test reconstruction MSE {_num(err, 4)}"
    return f"feature network test accuracy {_num(acc, 4)}"


def _curves_html(data: bytes | None, metric: str) -> str:
    if data is None:
        return ""
    return (f"<p>While they trained: each student's {metric.upper()} against its distillation time, measured on the "
            "<b>train</b> split at a small n (<code>--set eval_every</code>, <code>eval_n</code>), so it ranks a run "
            "over time, not methods against the table's test-split figures.</p>"
            f'<div class="plots">{_img(data, "quality while training", "plot")}</div>')


def _diffs_html(diffs: list[dict[str, Any]]) -> str:
    if not diffs:
        return ""
    head = "".join(f"<th>{c}</th>" for c in ("a", "b", "FD a", "FD b", "a / b", "FD a - FD b", "90% interval",
                                               "bootstrap", "verdict"))
    body = "\n".join(
        f"<tr><td>{html.escape(d['a'])}</td><td>{html.escape(d['b'])}</td><td>{_num(d['fd_a'])}</td>"
        f"<td>{_num(d['fd_b'])}</td><td>{_num(d['ratio'], 3)}</td><td>{_num(d['difference'], 3)}</td>"
        f"<td>{d['lo']:.3g} to {d['hi']:.3g}</td><td>{'paired' if d['paired'] else 'unpaired'}</td>"
        f"<td>{html.escape(d['verdict'])}</td></tr>" for d in diffs)
    return ("<h2>Differences</h2><p>FD of row a minus FD of row b with a 90% bootstrap interval (bias-corrected); "
            "paired rows share each sample's noise and label, so the same resampled indices are used for both; a "
            "difference is resolved when its interval excludes 0. Every student against the teacher's best row, and "
            f"every two students at one NFE.</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _img(data: bytes, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]:.3g}–{v[1]:.3g}"
    return html.escape(str(v))


def write_report(out: Path, name: str, results: list[dict[str, Any]], teacher: dict[str, Any],
                 curves: dict[str, list[tuple[float, float]]] | None = None,
                 diffs: list[dict[str, Any]] | None = None) -> Path:
    """``curves``: student name -> (distillation seconds, train-split quality) logged while it trained; ``diffs``:
    FD differences between rows with their bootstrap intervals (bench.compare_rows)."""
    out = Path(out)
    metric = "fd" if any(r.get("fd") is not None for r in results) else "swd"
    plots = {f"{metric}_vs_{x}.png": plot(results, metric, x) for x in ("nfe", "time")}
    if curves:
        plots[f"{metric}_while_training.png"] = plot_curves(curves, metric)
    for fname, data in plots.items():
        (out / fname).write_bytes(data)
    floor = next((r["floor"] for r in results if r.get("floor")), {})
    cols = ["label", "nfe", metric, f"{metric} 90% CI" if metric == "fd" else None, "kid" if metric == "fd" else "mmd",
            "precision", "recall", "accuracy", "loglik", "ms/sample", "samples/s", f"{metric} / floor", "train s"]
    cols = [c for c in cols if c]
    have = {c for c in cols if any(r.get(c.replace("train s", "train_seconds")) is not None for r in results)}
    cols = [c for c in cols if c in have or c in ("label", "nfe", metric, "ms/sample", "samples/s", f"{metric} / floor",
                                                  f"{metric} 90% CI")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "<th>samples</th>"
    body = []
    best = min((r[metric] for r in results if r.get(metric) is not None), default=None)
    for r in sorted(results, key=lambda r: (r["method"], r["name"], r["nfe"])):
        cells = {
            "label": html.escape(r["label"]), "nfe": str(r["nfe"]), metric: _num(r.get(metric)),
            "fd 90% CI": _num(r.get("fd_ci")), "kid": _num(r.get("kid"), 3), "mmd": _num(r.get("mmd"), 3),
            "precision": _num(r.get("precision"), 3), "recall": _num(r.get("recall"), 3),
            "accuracy": _num(r.get("accuracy"), 3), "loglik": _num(r.get("loglik"), 4),
            "ms/sample": _num(1000 * r["wall_seconds"] / r["n"], 3), "samples/s": _num(r["samples_per_s"], 4),
            f"{metric} / floor": _num(r[metric] / floor[metric]) if r.get(metric) and floor.get(metric) else "–",
            "train s": _num(r.get("train_seconds"), 4),  # teacher training, or the student's whole distillation
        }
        grid = out / r["grid"]
        img = _img(grid.read_bytes(), r["label"], "grid") if grid.is_file() else "–"
        cls = ' class="best"' if best is not None and r.get(metric) == best else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{cells[c]}</td>" for c in cols) + f"<td>{img}</td></tr>")
    training = teacher.get("training", {})
    quick = (" (the <b>quick</b> feature network, a smoke test: its FD is not comparable with the full one's)"
             if teacher.get("features") == "quick" else "")
    facts = (f"teacher <code>{html.escape(teacher['folder'])}</code>: {html.escape(str(training.get('objective', '')))}"
             f", {training.get('steps', '?')} steps, {training.get('wall_seconds', '?')} s of training; data "
             f"<b>{html.escape(teacher['data'])}</b>; n = {teacher['n']} samples per row against the test split; "
             f"guidance {teacher['guidance']}; {_feature_facts(results)}{quick}; floor "
             + ", ".join(f"{k} {_num(v)}" for k, v in floor.items() if v is not None))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fewstep bench: {html.escape(name)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ padding: 4px 8px; border-bottom: 1px solid #ddd;
text-align: right; }} th:first-child, td:first-child {{ text-align: left; }}
tr.best td {{ background: #eef8ee; }} img.grid {{ width: 120px; image-rendering: pixelated; }}
.plots img {{ width: 49%; }} code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head>
<body>
<h1>fewstep bench: {html.escape(name)}</h1>
<p>{facts}</p>
<p>Quality: Frechet distance (FD), KID, precision/recall (k=3) in the feature space of a classifier fewstep trains
on the train split; lower FD is better; the floor is the train split against the test split at the same n.
All rows share initial noise and class labels. Dashed lines: diffusers' schedulers on the same teacher, each at its
best timestep spacing. Wall time is this machine's and noisy; compare within a table.</p>
<div class="plots">{_img(plots[f"{metric}_vs_nfe.png"], f"{metric} vs NFE", "plot")}
{_img(plots[f"{metric}_vs_time.png"], f"{metric} vs time", "plot")}</div>
{_curves_html(plots.get(f"{metric}_while_training.png"), metric)}
<table id="results"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
{_diffs_html(diffs or [])}
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesOk = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.rows = document.querySelectorAll("#results tbody tr").length;
}});
</script>
</body></html>
"""
    path = out / "report.html"
    write_text(path, page)
    return path
