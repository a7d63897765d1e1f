"""``write_report(workdir, metrics, transcripts)``: the STARFlow2 digits demo's one-page ``report.html``,
self-contained (grids and transcript images inline as base64 PNGs, so the file can be copied anywhere).

``metrics`` is the dict ``eval.starflow2_demo`` writes to ``demo_metrics.json``; ``transcripts`` the
first seed of each interleaved prompt (``dict(prompt, html, parts)``, ``eval.transcript`` parts). One
section per scored task (``SECTIONS``, in order; each an ``<h2 id=...>``), after a headline table of
every target. The flow-only demo's report (``eval.report``) shares the page's look and helpers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from starflow2_jax import atomic
from starflow2_jax.eval import transcript
from starflow2_jax.eval.report import STYLE, esc, image_tag, num, pct, verdict

SECTIONS = ("text-to-image", "likelihood", "understanding", "interleaved", "next-digit", "cache-check", "timings")
_EXTRA_STYLE = ".transcript { border: 1px solid #ddd; padding: 0 1rem; margin: 1rem 0; }\n"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<tr>{''.join(f'<td>{c}</td>' for c in row)}</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>{cells}</table>"


def _headline(m: Mapping[str, Any]) -> str:
    t, c = m["targets"], m["checks"]
    t2i, inter, times = m["text_to_image"], m["interleaved"], m["timings"]
    total = times.get("demo_seconds")
    rows = [
        (f"Text → image: drawn digits recognised as asked (guidance {t2i['guidance']:g}, image temperature "
         f"{t2i['image_temperature']:g})", pct(t2i["accuracy"]),
         f"≥ {pct(t['t2i_accuracy'])}", verdict(c["t2i_accuracy"])),
        ("Text → image: within-class variety vs real digits (1 = as varied)", num(t2i["variety"], 2),
         f"{t['variety'][0]} – {t['variety'][1]}", verdict(c["variety"])),
        ("Held-out bits/dim (297 test digits, lower is better)", num(m["bits_per_dim"]["value"]), f"≤ {t['bpd']}",
         verdict(c["bpd"])),
        ("Understanding: “What digit is this?” answered right", pct(m["understanding"]["accuracy"]),
         f"≥ {pct(t['understanding'])}", verdict(c["understanding"])),
        ("Interleaved: documents with the right structure", pct(inter["structure"]),
         f"≥ {pct(t['interleaved_structure'])}", verdict(c["interleaved_structure"])),
        ("Interleaved: their images recognised as the number before them", pct(inter["image_accuracy"]),
         f"≥ {pct(t['interleaved_images'])}", verdict(c["interleaved_images"])),
        ("Next digit: drawn digit recognised as (d + 1) mod 10", pct(m["next_digit"]["accuracy"]),
         f"≥ {pct(t['next_digit'])}", verdict(c["next_digit"])),
        ("Cache equality: largest |difference| to one teacher-forced pass",
         f"{m['cache_check']['max_abs_difference']:.1e}", f"≤ {t['cache_difference']:g}",
         verdict(c["cache_difference"])),
        ("Whole demo: stages + scoring", "–" if total is None else f"{total / 60:.1f} min",
         f"≤ {t['demo_seconds'] / 60:.0f} min", verdict(c["demo_seconds"])),
    ]
    return _table(("metric", "value", "target", ""), rows)


def _text_to_image(workdir: str, m: Mapping[str, Any]) -> str:
    s = m["text_to_image"]
    j = s["judge"]
    figures = "".join(
        f"<figure>{image_tag(workdir, g['png'], 'samples at guidance %g' % g['guidance'])}<figcaption>guidance "
        f"{g['guidance']:g} (rows: digits 0–9; {pct(g['accuracy'])} recognised)</figcaption></figure>"
        for g in s["grids"])
    bad = f", {j['nonfinite']} non-finite" if j["nonfinite"] else ""
    classes = [str(c) for c in range(10)]
    per_class = _table(["digit"] + classes,
                       [["accuracy"] + [pct(j["per_class_accuracy"].get(c)) for c in classes],
                        ["variety"] + [num(j["variety"]["per_class"].get(c), 2) for c in classes],
                        ["novelty"] + [num(j["novelty"]["per_class"].get(c), 2) for c in classes]])
    return (f"<h2 id=\"text-to-image\">1. Text → image</h2>"
            f"<p>Prompt: “{esc(s['prompt'].format(name='seven'))}” (each digit's word) as the stage-3 training "
            f"documents lay it out up to the assistant's turn; the model writes its reply (greedy) and opens the "
            f"image. For seven:</p><pre>{esc(s['prompt_text'])}</pre><p>The replies' words, digits 0–9: "
            f"{esc(', '.join(repr(w) for w in s['replies']))} ({pct(s['reply_names_digit'])} name the digit asked "
            f"for; {pct(s['reply_opens_image'])} open the image themselves, the others get "
            f"<code>&lt;|vision_start|&gt;</code> fed in).</p><p>"
            f"{s['samples_per_digit']} samples per digit at guidance {s['guidance']:g} and image temperature "
            f"{s['image_temperature']:g} (each image step's noise is T·ε, ε ~ N(0, I); every image of the report "
            f"is drawn at it) were judged by a classifier "
            f"trained on the real training digits ({pct(m['classifier_test_accuracy'])} on the real held-out ones): "
            f"accuracy {pct(s['accuracy'])}, variety {num(s['variety'], 2)} (mean pairwise distance within a class "
            f"over the real digits'), novelty {num(s['novelty'], 2)} (distance to the nearest training digit over "
            f"that of real held-out digits; ≪ 1: copies){bad}.</p>{figures}{per_class}")


def _likelihood(m: Mapping[str, Any]) -> str:
    b = m["bits_per_dim"]
    return (f"<h2 id=\"likelihood\">2. Exact likelihood</h2><p>Held-out bits/dim {num(b['value'])} ± "
            f"{num(b['std_error'])} over {b['num_images']} test digits; context: {esc(b['context'])}. Pixels v ∈ "
            f"{{0..{b['levels']}}} as x = v/8 − 1, uniformly dequantised ({b['passes']} pass), bpd = "
            f"E[−log₂ p(x)]/64 + 3, the flow-only demo's definition (it reaches 2.10). Text NLL of the captions: "
            f"{num(b['text_nll_per_token'])} nats/token.</p>")


def _understanding(m: Mapping[str, Any]) -> str:
    u = m["understanding"]
    rows = [[str(d)] + [str(n) for n in row] for d, row in enumerate(u["confusion"])]
    wrong = "".join(f"<li>held-out digit {w['image']} (a {w['label']}): {esc(repr(w['answer']))}</li>"
                    for w in u["wrong_examples"])
    per = u.get("seconds_per_question")
    return (f"<h2 id=\"understanding\">3. Understanding</h2><p>“{esc(u['question'])}” about each of "
            f"{u['num_images']} held-out real digits (greedy answers; the image enters through the latent space and "
            f"the shallow flows, no vision tower): accuracy {pct(u['accuracy'])}; {u['unparsed']} answers named no "
            f"digit{'' if per is None else f'; {per * 1000:.0f} ms per question after the first'}.</p>"
            f"<h3>Confusion (rows: the digit shown; columns: the digit answered)</h3>"
            f"{_table(['shown'] + [str(c) for c in range(10)] + ['none'], rows)}"
            + (f"<p>First wrong answers:</p><ul>{wrong}</ul>" if wrong else ""))


def _interleaved(m: Mapping[str, Any], transcripts: Sequence[Mapping[str, Any]]) -> str:
    s = m["interleaved"]
    rows = []
    for p in s["prompts"]:
        reasons: dict[str, int] = {}
        for d in p["documents"]:
            if not d["ok"]:
                reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        common = "; ".join(f"{esc(r)} ×{n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        rows.append([esc(p["prompt"]), esc(" ".join(p["expected"])), pct(p["structure"]), pct(p["image_accuracy"]),
                     common or "–"])
    shown = "".join(f"<div class=\"transcript\"><h3>{esc(t['prompt'])} (seed 0)</h3>"
                    f"{transcript.render_parts(t['parts'])}</div>" for t in transcripts)
    return (f"<h2 id=\"interleaved\">4. Interleaved text and images</h2><p>Each prompt with "
            f"{s['prompts'][0]['seeds'] if s['prompts'] else 0} seeds at guidance {s['guidance']:g} (text "
            f"temperature {s['temperature']:g}, image temperature {s['image_temperature']:g}); each drawn image is "
            f"read back by the model from the caches, never re-encoded. Right structure: the expected number words "
            f"in order, each followed by exactly one "
            f"image, then the end of turn. {pct(s['structure'])} of the documents have it; "
            f"{pct(s['image_accuracy'])} of their images are recognised as their number "
            f"({pct(s['image_accuracy_all'])} of all {s['images']} images after a digit word).</p>"
            f"{_table(['prompt', 'expected', 'right structure', 'images right', 'commonest failures'], rows)}{shown}")


def _next_digit(workdir: str, m: Mapping[str, Any]) -> str:
    n = m["next_digit"]
    words = "" if n["word_accuracy"] is None else \
        (f" The word it says before its image names (d + 1) mod 10 in {pct(n['word_accuracy'])} of them; "
         f"{pct(n['image_matches_word'])} of the images that follow a digit word are recognised as that word's "
         f"digit.")
    return (f"<h2 id=\"next-digit\">5. Editing: the next digit</h2><p>A held-out real digit d as context and "
            f"“{esc(n['prompt'])}”; the model writes the assistant turn (images at guidance {n['guidance']:g}, "
            f"image temperature {n['image_temperature']:g}) and "
            f"drew an image in {n['images_drawn']} of {n['num_images']} cases; {pct(n['accuracy'])} of all are "
            f"recognised as (d + 1) mod 10 (no image counts as wrong).{words}</p>"
            f"<figure>{image_tag(workdir, n['png'], 'next digit')}"
            f"<figcaption>top: the context digit (one of each class); bottom: the drawn next digit</figcaption>"
            f"</figure>")


def _cache_check(m: Mapping[str, Any]) -> str:
    c = m["cache_check"]
    return (f"<h2 id=\"cache-check\">6. Cache equality</h2><p>The first interleaved document "
            f"(“{esc(c['prompt'])}”, "
            f"seed {c['seed']}: {c['positions']} positions, {c['images']} drawn images"
            f"{', guided: both halves' if c['guided'] else ''}): the caches left by generation against one "
            f"teacher-forced pass over the final sequence differ by at most {c['max_abs_difference']:.2e}.</p>")


def _timings(m: Mapping[str, Any]) -> str:
    t = m["timings"]
    stage_rows = [[esc(k), f"{v:.1f} s"] for k, v in t["stages"].items()]
    section_rows = [[esc(k), f"{v:.1f} s"] for k, v in t["scoring"].items()]
    total = t.get("demo_seconds")
    return (f"<h2 id=\"timings\">7. Wall time</h2><h3>Stages</h3>"
            f"{_table(['stage', 'wall time'], stage_rows) if stage_rows else '<p>(not given)</p>'}"
            f"<h3>Scoring sections</h3>{_table(['section', 'wall time'], section_rows)}"
            f"<p>Scoring {t['scoring_seconds']:.1f} s"
            f"{'' if total is None else f'; the whole demo {total:.0f} s ({total / 60:.1f} min)'}.</p>")


def render_report(workdir: os.PathLike | str, metrics: Mapping[str, Any],
                  transcripts: Sequence[Mapping[str, Any]] = ()) -> str:
    """The report's HTML (a string), see the module docstring."""
    workdir = os.fspath(workdir)
    run = metrics["run"]
    settings = json.dumps({"run": run, "settings": metrics["settings"]}, indent=2, sort_keys=True)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>starflow2-jax: the STARFlow2 digits demo</title>"
        f"<style>{transcript.PART_STYLE}{STYLE}{_EXTRA_STYLE}</style></head><body>"
        "<h1>starflow2-jax: the STARFlow2 digits demo</h1>"
        "<p>A tiny Qwen2.5-VL language model trained on the demo's text (stage 0), frozen, and the STARFlow2 "
        "flows coupled to it under one causal mask, trained in three stages on documents made of the demo's "
        "sentences and scikit-learn's real 8×8 handwritten digits (1500 train / 297 held-out). Final run: "
        f"{esc(run['workdir'])}, step {run['step']}.</p>"
        f"{_headline(metrics)}{_text_to_image(workdir, metrics)}{_likelihood(metrics)}{_understanding(metrics)}"
        f"{_interleaved(metrics, transcripts)}{_next_digit(workdir, metrics)}{_cache_check(metrics)}"
        f"{_timings(metrics)}<h2>Settings</h2><pre>{esc(settings)}</pre></body></html>\n")


def write_report(workdir: os.PathLike | str, metrics: Mapping[str, Any], transcripts: Sequence[Mapping[str, Any]] = (),
                 name: str = "report.html") -> str:
    """Writes ``<workdir>/<name>`` with ``atomic.write_text`` (rendered first: a failure leaves no file);
    returns its path."""
    path = os.path.join(os.fspath(workdir), name)
    return atomic.write_text(path, render_report(workdir, metrics, transcripts))
