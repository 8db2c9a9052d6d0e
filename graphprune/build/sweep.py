"""Sweeps: a config with a `[sweep]` section is a build per combination of the values it lists.

    [sweep]
    engine = "local"                    # or "ray": every variant a Ray task (pip install 'graphprune[ray]')
    vary = { "prune.ratio" = [0.25, 0.5], "prune.importance" = ["l2", "obs"] }

Variants write to `<output>/<variant>/` and share one stage cache, `<output>/.stages/`, so the stages
they have in common (the export, the dense model's fuse and quantize) run once, first; then the
variants run, one after another or as Ray tasks. `sweep.json` and `sweep.html` sum them up.
"""

from __future__ import annotations

import copy
import html
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from graphprune.build.config import BuildConfig, ConfigKeyError, parse_config, read_toml
from graphprune.build.runner import BuildResult, plan, run_build

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. "ratio=0.25,importance=obs"
    values: dict[str, Any]  # "section.key" -> value
    raw: dict[str, Any]  # the config it builds, as parsed TOML


def is_sweep(path: str | Path) -> bool:
    return "sweep" in read_toml(Path(path))


def variants(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> tuple[Path, list[Variant]]:
    """The sweep's output folder and its variants (each config checked)."""
    path = Path(path)
    raw = read_toml(path)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    sweep = raw.pop("sweep", {})
    name = path.name
    unknown = set(sweep) - {"engine", "vary"}
    if unknown:
        raise ConfigKeyError(f"{name}: [sweep] unknown key '{sorted(unknown)[0]}' (keys: engine, vary)")
    if sweep.get("engine", "local") not in ENGINES:
        raise ConfigKeyError(f"{name}: [sweep] engine: must be one of {', '.join(ENGINES)}, got {sweep['engine']!r}")
    vary = sweep.get("vary")
    if not isinstance(vary, dict) or not vary:
        raise ConfigKeyError(f"{name}: [sweep] vary: give a table of \"section.key\" = [values]")
    for key, values in vary.items():
        if key.count(".") != 1 or not isinstance(values, list) or not values:
            raise ConfigKeyError(f"{name}: [sweep] vary.{key}: must be \"section.key\" = [values]")
    combinations = [dict(zip(vary, combination, strict=True)) for combination in itertools.product(*vary.values())]
    output: Path | None = None
    found = []
    for values in combinations:
        label = ",".join(f"{key.split('.')[1]}={value}" for key, value in values.items())
        variant = copy.deepcopy(raw)
        for key, value in values.items():
            section, option = key.split(".")
            variant.setdefault(section, {})[option] = value
        if output is None:  # the sweep's folder: [build] output of the config, as a variant reads it
            output = parse_config(copy.deepcopy(variant), path).output
        variant.setdefault("build", {}).update({"output": str(output / label), "cache": str(output / ".stages")})
        parse_config(copy.deepcopy(variant), path)  # names a bad key before anything runs
        found.append(Variant(label, values, variant))
    assert output is not None  # vary is a non-empty table of non-empty lists
    return output, found


def engine_of(path: str | Path) -> str:
    return read_toml(Path(path)).get("sweep", {}).get("engine", "local")


def _build_variant(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """One variant's build (in this process or a Ray worker); its report."""
    result = run_build(parse_config(raw, Path(path)), console=Console(stderr=True, quiet=True))
    return result.report


def run_sweep(path: str | Path, console: Console | None = None, engine: str | None = None,
              overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every variant (see the module doc); returns the summary written to sweep.json."""
    console = console or Console(stderr=True)
    path = Path(path).resolve()
    engine = engine or engine_of(path)
    output, found = variants(path, overrides)
    configs: list[BuildConfig] = [parse_config(copy.deepcopy(v.raw), path) for v in found]
    keys = [{s.key for s in plan(config)[1] if s.makes_model} for config in configs]
    shared = frozenset(set.intersection(*keys))
    if shared:  # once, before the variants fan out: no two tasks make the same stage
        console.print(f"sweep: {len(found)} variants; running the {len(shared)} stages they share first",
                      highlight=False)
        run_build(configs[0], console=console, only=shared)
    if engine == "ray":
        reports = _on_ray(path, found, console)
    else:
        reports = []
        for variant in found:
            console.print(f"sweep: variant {variant.name}", highlight=False)
            reports.append(run_build(parse_config(copy.deepcopy(variant.raw), path), console=console).report)
    summary = {"config": str(path), "engine": engine, "variants": [
        {"variant": v.name, "values": v.values, "output": str(output / v.name), "table": r["table"],
         "comparisons": r["comparisons"]} for v, r in zip(found, reports, strict=True)]}
    (output / "sweep.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (output / "sweep.html").write_text(_render(summary))
    return summary


def _on_ray(path: Path, found: list[Variant], console: Console) -> list[dict[str, Any]]:
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("engine = \"ray\" needs ray", name="ray") from None
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_build_variant)
        pending = [task.remote(str(path), variant.raw) for variant in found]
        console.print(f"sweep: {len(pending)} variants submitted to Ray", highlight=False)
        return ray.get(pending)
    finally:
        if started:
            ray.shutdown()


def _render(summary: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for variant in summary["variants"]:
        final = [r for r in variant["table"] if not r["reference"]][-1]
        comparisons = "; ".join(f"{k}: {v:.2f}×" for k, v in variant["comparisons"].items())
        quality = "–" if final["quality"] is None else f"{final['metric']} {final['quality']:.4f}"
        rows.append(f"<tr><td><a href='{esc(variant['variant'])}/report.html'>{esc(variant['variant'])}</a></td>"
                    f"<td>{esc(final['row'])}</td><td>{final['params']:,}</td><td>{esc(quality)}</td>"
                    f"<td>{esc(comparisons)}</td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphprune sweep</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}</style></head><body>
<h1>graphprune sweep: {esc(Path(summary['config']).name)}</h1><p>engine: {esc(summary['engine'])}</p>
<table><tr><th>variant</th><th>final model</th><th>parameters</th><th>quality</th><th>speedup, same form</th></tr>
{''.join(rows)}</table></body></html>
"""


__all__ = ["ENGINES", "Variant", "BuildResult", "is_sweep", "run_sweep", "variants"]
