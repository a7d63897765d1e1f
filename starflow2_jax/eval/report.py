"""``write_report(workdir, metrics)``: the demo's one-page ``report.html`` (self-contained: the sample
grids are embedded as base64 PNGs, so the file can be copied anywhere).

``metrics`` is the dict ``starflow2_jax.eval.demo`` writes to ``demo_metrics.json``: ``bpd``,
``targets``, ``reference``, ``classifier_test_accuracy``, ``guidance`` (one entry per sample file
with its judge result and PNG path), ``timings``, ``steps``, ``config`` and ``checks``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any, Mapping

from starflow2_jax import atomic

# the page's look, shared with the STARFlow2 demo's report (eval.starflow2_report)
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.ok { color: #176f2c; font-weight: 600; } .miss { color: #b00020; font-weight: 600; }
figure { display: inline-block; margin: 0 1.5rem 1rem 0; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; }
pre { background: #f5f5f5; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
"""


def esc(value: Any) -> str:
    """``str(value)`` HTML-escaped."""
    return html.escape(str(value))


def num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "–" for anything else (None: not measured)."""
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return "–"


def pct(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal; "–" for anything else."""
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "–"


def verdict(ok: bool | None) -> str:
    """A target's verdict as HTML: "met" / "missed", empty for None (no target checked)."""
    if ok is None:
        return ""
    return '<span class="ok">met</span>' if ok else '<span class="miss">missed</span>'


def image_tag(workdir: str, png: str | None, alt: str) -> str:
    """An ``<img>`` with the PNG file ``png`` (relative to ``workdir``) inline as base64; a note when it
    is not given or missing."""
    if not png:
        return "<p>(no image)</p>"
    path = png if os.path.isabs(png) else os.path.join(workdir, png)
    if not os.path.exists(path):
        return f"<p>(missing image {esc(png)})</p>"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def _headline(metrics: Mapping[str, Any]) -> str:
    targets, checks = metrics.get("targets", {}), metrics.get("checks", {})
    ref = metrics.get("reference", {})
    rows = [
        ("Held-out bits/dim (test split, lower is better)", num(metrics.get("bpd")),
         f"≤ {targets.get('bpd', '–')}", verdict(checks.get("bpd"))),
        ("Generated digits recognised as the requested class (the lowest over guidance "
         + "–".join(f"{g:g}" for g in targets.get("accuracy_guidance", [])) + ")",
         pct(metrics.get("guided_accuracy")), f"≥ {pct(targets.get('accuracy'))}", verdict(checks.get("accuracy"))),
        ("Within-class variety vs real digits (1 = as varied; mean over the same guidance)", num(metrics.get("guided_variety"), 2),
         f"{targets.get('variety_min', '–')} – {targets.get('variety_max', '–')}", verdict(checks.get("variety"))),
    ]
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td><td>{d}</td></tr>" for a, b, c, d in rows)
    refs = "; ".join(f"{esc(k)}: {esc(v)}" for k, v in ref.items())
    return (f"<table><tr><th>metric</th><th>value</th><th>target</th><th></th></tr>{body}</table>"
            f"<p>For scale (the reference PyTorch TarFlow on this data, 2 CPU cores): {refs}. Bits/dim here: "
            "pixels v ∈ {0..16} scaled to x = v/8 − 1, uniformly dequantised, "
            "bpd = E[−log₂ p(x)]/64 + 3.</p>")


def _guidance_sections(workdir: str, metrics: Mapping[str, Any]) -> str:
    entries = metrics.get("guidance", [])
    figures = "".join(
        f"<figure>{image_tag(workdir, e['png'], 'samples at guidance %g' % e['guidance'])}"
        f"<figcaption>guidance {e['guidance']:g} (rows: digits 0–9)</figcaption></figure>"
        for e in entries if e.get("png"))
    judged = [e for e in entries if e.get("judge")]
    head = "<tr><th>guidance</th><th>samples</th><th>accuracy</th><th>variety ratio</th>" \
           "<th>novelty ratio</th><th>collapsed classes</th><th>non-finite</th></tr>"
    rows = "".join(
        f"<tr><td>{e['guidance']:g}</td><td>{e['judge']['num_samples']}</td><td>{pct(e['judge']['accuracy'])}</td>"
        f"<td>{num(e['judge']['variety']['mean_ratio'], 2)}</td><td>{num(e['judge']['novelty']['mean_ratio'], 2)}</td>"
        f"<td>{esc(e['judge']['variety']['collapsed'] or 'none')}</td><td>{e['judge']['nonfinite']}</td></tr>"
        for e in judged)
    classes = [str(c) for c in range(10)]
    per_class_head = "<tr><th>guidance</th>" + "".join(f"<th>{c}</th>" for c in classes) + "</tr>"
    acc_rows = "".join(
        f"<tr><td>{e['guidance']:g}</td>"
        + "".join(f"<td>{pct(e['judge']['per_class_accuracy'].get(c))}</td>" for c in classes) + "</tr>"
        for e in judged)
    var_rows = "".join(
        f"<tr><td>{e['guidance']:g}</td>"
        + "".join(f"<td>{num(e['judge']['variety']['per_class'].get(c), 2)}</td>" for c in classes) + "</tr>"
        for e in judged)
    return (f"<h2>Samples</h2>{figures}"
            f"<h2>Recognition and variety</h2>"
            f"<p>Judged on separate sample sets ({esc(', '.join(e['npz'] for e in judged))}). Accuracy: the share "
            f"of generated digits that a classifier trained on the real training digits (scikit-learn SVC; "
            f"{pct(metrics.get('classifier_test_accuracy'))} on the real held-out digits) recognises as the "
            f"requested class. Variety: mean pairwise pixel distance within a class divided by that of the real "
            f"training digits of the class (≈ 1: as varied as real data; ≪ 1: mode collapse). Novelty: mean "
            f"distance to the nearest real training digit, divided by that of the real held-out digits "
            f"(≪ 1: copies of training digits).</p>"
            f"<table>{head}{rows}</table>"
            f"<h3>Accuracy per class</h3><table>{per_class_head}{acc_rows}</table>"
            f"<h3>Variety ratio per class</h3><table>{per_class_head}{var_rows}</table>")


def _timings(metrics: Mapping[str, Any]) -> str:
    timings = metrics.get("timings", {})
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    if timings:
        rows += f"<tr><th>sum</th><th>{sum(timings.values()):.1f} s</th></tr>"
    steps = metrics.get("steps")
    resumed = " (resumed from an existing checkpoint: the training time covers only this run)" \
        if metrics.get("resumed") else ""
    return (f"<h2>Training</h2><p>{esc(steps)} optimiser steps{resumed}.</p>"
            f"<table><tr><th>stage</th><th>wall time</th></tr>{rows}</table>")


def render_report(workdir: os.PathLike | str, metrics: Mapping[str, Any]) -> str:
    """The report's HTML (a string) for ``metrics`` (see the module docstring)."""
    workdir = os.fspath(workdir)
    config = json.dumps(metrics.get("config", {}), indent=2, sort_keys=True)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>starflow2-jax digits demo</title><style>{STYLE}</style></head><body>"
        "<h1>starflow2-jax: the digits demo</h1>"
        "<p>A label-conditioned STARFlow-style autoregressive flow trained on scikit-learn's real 8×8 "
        "handwritten digits (1500 train / 297 held-out).</p>"
        f"{_headline(metrics)}{_guidance_sections(workdir, metrics)}{_timings(metrics)}"
        f"<h2>Config</h2><pre>{esc(config)}</pre></body></html>\n")


def write_report(workdir: os.PathLike | str, metrics: Mapping[str, Any], name: str = "report.html") -> str:
    """Writes ``<workdir>/<name>`` with ``atomic.write_text`` (rendered first: a failure leaves no
    file); returns its path."""
    path = os.path.join(os.fspath(workdir), name)
    return atomic.write_text(path, render_report(workdir, metrics))
