"""Runtime configs beside a pruned decoder: a Hugging Face `config.json` or an onnxruntime-genai
`genai_config.json` with the head counts and FFN width the pruned graph has.

Both formats hold one count per model, so every layer must keep the same number of heads (and,
where the config holds it, FFN neurons): what `--allocation uniform`, the default, gives, or
`--allocation global --uniform-heads` for the heads; otherwise the config cannot describe the
model and writing it is refused with the per-layer counts.
"""

from __future__ import annotations

import json
from pathlib import Path

from graphprune.errors import GraphpruneError
from graphprune.pipeline import Report


class ConfigError(GraphpruneError):
    """The config cannot describe the pruned model, or it is not one this module knows."""


def _uniform(counts: list[int], what: str) -> int | None:
    if not counts:
        return None
    if len(set(counts)) > 1:
        raise ConfigError(f"layers keep different {what} ({', '.join(map(str, counts))}); a config holds one "
                          "count: prune with --allocation uniform")
    return counts[0]


def pruned_sizes(report: Report | dict, config: dict, gqa: str = "kv") -> dict[str, int]:
    """New `num_attention_heads`, `num_key_value_heads`, `intermediate_size` and `hidden_size` from
    the report's groups (in layer order) and the dense config."""
    groups = report["groups"] if isinstance(report, dict) else report.groups
    after = {kind: [g["units_after"] for g in groups if g["kind"] == kind and g["units_after"] is not None
                    and g["units_after"] < g["units_before"]] for kind in ("head", "neuron", "hidden")}
    queries = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads", queries)
    sizes: dict[str, int] = {}
    heads = _uniform(after["head"], "head counts")
    if heads is not None and queries and kv:
        if gqa == "query":  # the unit is one query head of every KV head
            sizes["num_attention_heads"] = kv * heads
        else:  # the unit is a KV head with its queries / kv query heads
            sizes["num_key_value_heads"] = heads
            sizes["num_attention_heads"] = heads * (queries // kv)
    # only what the config holds must be one count (genai_config has no FFN width)
    neurons = _uniform(after["neuron"], "FFN widths") if "intermediate_size" in config else None
    if neurons is not None:
        sizes["intermediate_size"] = neurons
    hidden = _uniform(after["hidden"], "hidden sizes") if "hidden_size" in config else None
    if hidden is not None:
        sizes["hidden_size"] = hidden
    return sizes


def write_config(source: Path, target_folder: Path, report: Report | dict, gqa: str = "kv") -> Path:
    """Write `source` (config.json or genai_config.json) into `target_folder` with the pruned sizes."""
    try:
        config = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config {source}: {exc}") from exc
    genai = isinstance(config.get("model"), dict) and "decoder" in config["model"]
    if genai:
        decoder = config["model"]["decoder"]
        sizes = pruned_sizes(report, decoder, gqa)
        for key in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
            if key in sizes:
                decoder[key] = sizes[key]
    else:
        if "num_attention_heads" not in config:
            raise ConfigError(f"{source}: neither a Hugging Face config (num_attention_heads) nor a genai_config")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        config.update(pruned_sizes(report, config, gqa))
        config["head_dim"] = head_dim  # else derived as hidden_size / num_attention_heads: wrong once heads go
    target = Path(target_folder) / Path(source).name
    target.write_text(json.dumps(config, indent=2) + "\n")
    return target
