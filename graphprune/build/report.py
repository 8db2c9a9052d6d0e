"""The build report: report.json (every figure) and report.html (one self-contained page: the stage
table, the comparisons and the charts inlined as images; no scripts, no network)."""

from __future__ import annotations

import base64
import datetime
import html
import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import graphprune
from graphprune.build.config import BuildConfig
from graphprune.ir.model import model_bytes

if TYPE_CHECKING:
    from graphprune.build.runner import Step
    from graphprune.build.stages import Context

CHARTS = "charts"


def build_report(config: BuildConfig, ctx: Context, steps: list[Step], written: dict[str, Any]) -> dict[str, Any]:
    """The report's content (what report.json holds)."""
    verify = next((s.stats for s in steps if s.name == "verify"), {})
    bench = next((s.stats for s in steps if s.name == "bench"), {})
    models = [s for s in steps if s.makes_model and s.name != "export"]
    rows = []
    for label, step in [("dense", None), *[(s.label, s) for s in models]]:
        timing = bench.get("models", {}).get(label, {})
        checked = verify.get("models", {}).get(label, {})
        path = ctx.dense if step is None else step.model
        rows.append({"row": label, "stage": "source" if step is None and ctx.source_model() is not None
                     else "export" if step is None else step.name,
                     "reference": bool(step and step.reference), "params": _params(path),
                     "macs": timing.get("macs"), "file_bytes": timing.get("file_bytes", None if path is None else model_bytes(path)),
                     "latency_ms": timing.get("latency_ms_median"), "speedup": timing.get("speedup"),
                     "speedup_rounds": timing.get("speedup_rounds"), "metric": checked.get("metric"),
                     "quality": checked.get("value"), "quality_all": checked.get("quality")})
    report = {
        "title": config["report"]["title"] or f"graphprune build: {config.path.name}",
        "config": str(config.path), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "graphprune": graphprune.__version__, "provider": config["build"]["provider"],
        "evaluation": verify.get("data"), "bench": bench.get("data"),
        "stages": [{"stage": s.name + (" (dense)" if s.reference else ""), "row": s.label, "key": s.key,
                    "cached": s.cached, "seconds": round(s.seconds, 2), "stats": s.stats} for s in steps],
        "table": rows, "comparisons": _comparisons(rows), "output": written, "charts": [],
    }
    return report


def _params(path: Path | None) -> int | None:
    """Weights: the elements of float and 8-bit initializers (an INT8 model's weights are int8;
    int64 shape constants are not weights)."""
    if path is None:
        return None
    import numpy as np
    import onnx

    weights = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    proto = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in proto.graph.initializer if t.data_type in weights))


def _form(row: str) -> str:
    return row.rsplit(" ", 1)[-1] if row.endswith(("int8", "int4", "fused")) else "plain"


def _comparisons(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Latency ratios measured in the same interleaved run: the last pruned model of each form
    (plain, fused, int8) against the dense model of the same form, so that every gain is shown
    against a dense model that got the same treatment."""
    dense: dict[str, dict[str, Any]] = {}
    pruned: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["latency_ms"]:
            (dense if r["reference"] or r["row"] == "dense" else pruned)[_form(r["row"])] = r
    return {f"{pruned[form]['row']} vs {dense[form]['row']}": round(dense[form]["latency_ms"]
                                                                   / pruned[form]["latency_ms"], 3)
            for form in pruned if form in dense}


def _chart_stages(rows: list[dict[str, Any]], path: Path) -> Path | None:
    timed = [r for r in rows if r["latency_ms"]]
    if not timed:
        return None
    from graphprune.tools.charts import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    labels = [r["row"] for r in timed]
    colours = ["#7f7f7f" if r["row"] == "dense" or r["reference"] else "#1f77b4" for r in timed]
    left.barh(labels[::-1], [r["latency_ms"] for r in timed][::-1], color=colours[::-1])
    left.set_xlabel("latency, ms per batch (median)")
    left.set_title("latency per model (grey: dense and dense-derived)")
    scored = [r for r in timed if r["quality"] is not None]
    for r in scored:
        right.scatter(r["speedup"], r["quality"], color="#7f7f7f" if r["reference"] or r["row"] == "dense"
                      else "#1f77b4")
        right.annotate(r["row"], (r["speedup"], r["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    right.set_xlabel("speedup over dense (same run)")
    right.set_ylabel(scored[0]["metric"] if scored else "quality")
    right.set_title("quality against speed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], output: Path, prune_report: Path | None = None) -> Path:
    """report.json, the charts (PNG, under charts/) and report.html into `output`; returns the page."""
    from graphprune.tools.charts import plot_importance, plot_units

    charts = output / CHARTS
    charts.mkdir(parents=True, exist_ok=True)
    made = [_chart_stages(report["table"], charts / "stages.png")]
    if prune_report is not None and prune_report.is_file():
        pruned = SimpleNamespace(**json.loads(prune_report.read_text()))
        made += [plot_units(pruned, charts / "units.png"),  # type: ignore[arg-type]
                 plot_importance(pruned, charts / "importance.png")]  # type: ignore[arg-type]
    report["charts"] = [str(p.relative_to(output)) for p in made if p is not None]
    (output / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    page = output / "report.html"
    page.write_text(render_html(report, output))
    return page


def _number(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _summary(stats: dict[str, Any]) -> str:
    """A stage's stats in one line (verify and bench list their models; the table has their figures)."""
    if "models" in stats:
        return f"{len(stats['models'])} models on {stats.get('data')}"
    return json.dumps(stats, default=str)


def render_html(report: dict[str, Any], output: Path) -> str:
    esc = html.escape
    head = ("<tr><th>model</th><th>stage</th><th>parameters</th><th>MACs</th><th>file MB</th>"
            "<th>latency ms</th><th>speedup</th><th>quality</th></tr>")
    body = []
    for r in report["table"]:
        quality = "–" if r["quality"] is None else f"{r['metric']} {r['quality']:.4f}"
        others = {k: v for k, v in (r["quality_all"] or {}).items() if k != r["metric"]}
        extra = "".join(f" <span class=dim>{esc(k)} {v:.3f}</span>" for k, v in others.items())
        spread = ""
        if r["speedup_rounds"]:
            spread = f" <span class=dim>({min(r['speedup_rounds']):.2f}–{max(r['speedup_rounds']):.2f})</span>"
        body.append(f"<tr class='{'ref' if r['reference'] or r['row'] == 'dense' else ''}'><td>{esc(r['row'])}</td>"
                    f"<td>{esc(r['stage'])}</td><td>{_number(r['params'], ',')}</td><td>{_number(r['macs'], ',')}</td>"
                    f"<td>{_number(r['file_bytes'] and r['file_bytes'] / 1e6, '.2f')}</td>"
                    f"<td>{_number(r['latency_ms'], '.2f')}</td><td>{_number(r['speedup'], '.2f')}{spread}</td>"
                    f"<td>{esc(quality)}{extra}</td></tr>")
    stage_rows = "".join(
        f"<tr><td>{esc(s['stage'])}</td><td>{esc(s['row'])}</td><td><code>{esc(s['key'])}</code></td>"
        f"<td>{'cached' if s['cached'] else 'ran'}</td><td>{s['seconds']:.1f}</td>"
        f"<td class=left><code>{esc(_summary(s['stats']))}</code></td></tr>" for s in report["stages"])
    comparisons = "".join(f"<li>{esc(name)}: <b>{value:.2f}×</b></li>" for name, value in report["comparisons"].items())
    images = "".join(f"<figure><img alt='{esc(chart)}' src='data:image/png;base64,"
                     f"{base64.b64encode((output / chart).read_bytes()).decode()}'><figcaption>{esc(chart)}"
                     "</figcaption></figure>" for chart in report["charts"])
    notes = (f"Quality: against the dense model's outputs on {esc(str(report['evaluation']))}. "
             f"Latency: {esc(str(report['bench'] or 'not measured'))}, provider {esc(report['provider'])}, "
             "all models interleaved in one run; speedup = dense latency / this model's (per-round range).")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report['title'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, td:nth-child(2), td.left, th {{ text-align: left; }}
tr.ref {{ color: #555; background: #f5f5f5; }}
.dim {{ color: #888; font-size: 12px; }}
code {{ font-size: 12px; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figure {{ margin: 1em 0; }}
</style></head>
<body>
<h1>{esc(report['title'])}</h1>
<p class=dim>{esc(report['config'])} · graphprune {esc(report['graphprune'])} · {esc(report['created'])}</p>
<h2>Models</h2>
<table>{head}{''.join(body)}</table>
<p>{notes}</p>
<h2>Pruned against dense, same form</h2>
<ul>{comparisons or '<li>not measured (no [bench])</li>'}</ul>
<h2>Charts</h2>
{images or '<p>none</p>'}
<h2>Stages</h2>
<table><tr><th>stage</th><th>model</th><th>key</th><th>this run</th><th>seconds</th><th>what it did</th></tr>
{stage_rows}</table>
<p>Output: <code>{esc(json.dumps(report['output'], default=str))}</code></p>
</body></html>
"""
