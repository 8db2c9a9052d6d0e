"""The prune report as pictures: units kept per group (layer), and how the importance scores spread.

`write_report_dir(report, folder)` writes `report.json`, `units.png` and `importance.png`:

- units.png: one bar per prunable group in graph order (attention heads, FFN neurons, conv channels,
  hidden size...), the full height its units before pruning and the dark part the units kept,
  coloured by kind; frozen groups are grey.
- importance.png: per group, the spread of its units' scores divided by the group's mean score (box:
  quartiles, whiskers: 5th-95th percentile, log scale), so groups scored on different scales compare;
  the dots are the lowest score among the units each group kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphprune.pipeline import Report

KIND_COLOURS = {"head": "#c0504d", "neuron": "#1f5f8b", "channel": "#4f8a3c", "hidden": "#8064a2"}
OTHER_COLOUR = "#7f7f7f"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, kinds: list[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=KIND_COLOURS.get(k, OTHER_COLOUR), label=k) for k in kinds]
    handles.append(Patch(color=OTHER_COLOUR, label="frozen"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def _short(label: str, width: int = 36) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def plot_units(report: Report, path: Path, title: str = "units kept per group") -> Path:
    groups = [g for g in report.groups if (g["units_before"] or 0) > 0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(groups) + 2), 4.8), dpi=110)
    x = np.arange(len(groups))
    colours = [OTHER_COLOUR if g["frozen"] else KIND_COLOURS.get(g["kind"], OTHER_COLOUR) for g in groups]
    ax.bar(x, [g["units_before"] for g in groups], color=colours, alpha=0.25, width=0.8)
    ax.bar(x, [g["units_after"] for g in groups], color=colours, width=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(g.get("label", str(g["id"]))) for g in groups], rotation=90, fontsize=6)
    ax.set_ylabel("units (light: before, dark: kept)")
    ax.set_yscale("log" if max((g["units_before"] for g in groups), default=1) > 50 * min(
        (g["units_before"] for g in groups), default=1) else "linear")
    ax.set_title(f"{title}: {sum(g['units_after'] for g in groups):,} of {sum(g['units_before'] for g in groups):,} "
                 "units kept")
    _legend(ax, sorted({g["kind"] for g in groups}))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_importance(report: Report, path: Path, title: str = "importance per group") -> Path | None:
    """None when the run scored nothing (no `score-importance` pass)."""
    groups = [g for g in report.groups if g.get("scores")]
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(groups) + 2), 4.8), dpi=110)
    normalized = []
    for g in groups:
        values = np.asarray(g["scores"], np.float64)
        mean = float(np.mean(values)) if np.mean(values) > 0 else 1.0
        normalized.append(np.maximum(values / mean, 1e-6))
    boxes = ax.boxplot(normalized, whis=(5, 95), showfliers=False, patch_artist=True, widths=0.7)
    for box, g in zip(boxes["boxes"], groups, strict=True):
        box.set_facecolor(KIND_COLOURS.get(g["kind"], OTHER_COLOUR))
        box.set_alpha(0.6)
    for i, (g, values) in enumerate(zip(groups, normalized, strict=True)):
        kept = g["units_after"]
        if 0 < kept < len(values):  # the lowest kept score: the line this group was cut at
            ax.plot(i + 1, np.sort(values)[len(values) - kept], "k.", markersize=5)
    ax.set_xticks(np.arange(1, len(groups) + 1))
    ax.set_xticklabels([_short(g.get("label", str(g["id"]))) for g in groups], rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("score / group mean (dot: lowest kept)")
    ax.set_title(title)
    _legend(ax, sorted({g["kind"] for g in groups}))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report_dir(report: Report, folder: Path, name: str = "") -> list[Path]:
    """report.json plus the charts; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "report.json"]
    written[0].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    prefix = f"{name}: " if name else ""
    written.append(plot_units(report, folder / "units.png", title=f"{prefix}units kept per group"))
    chart = plot_importance(report, folder / "importance.png", title=f"{prefix}importance per group")
    if chart is not None:
        written.append(chart)
    return written
