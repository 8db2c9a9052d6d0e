"""1,000 fuzz cases: random MLP-style graphs, conv stacks and attention blocks (graphprune.testing.fuzz)
pruned with random options. Counts verified models, clean refusals (with their reasons) and anything else (bugs).

    pip install -c constraints.txt -e '.[test]'
    python benchmarks/fuzz.py [--cases 1000] [--out benchmarks/results/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphprune.testing.fuzz import attention_graphs, conv_graphs, mlp_graphs, prune_options, run_case

FAMILIES = {"mlp": mlp_graphs, "conv": conv_graphs, "attention": attention_graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz.json"))
    args = parser.parse_args()
    outcomes: Counter = Counter()
    families: Counter = Counter()
    failures: list[dict] = []
    start = time.perf_counter()

    @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(family=st.sampled_from(sorted(FAMILIES)), data=st.data(), options=prune_options())
    def case(family: str, data, options: dict) -> None:
        text = data.draw(FAMILIES[family]())
        families[family] += 1
        try:
            outcome = run_case(text, options)
        except Exception as exc:  # a bug: recorded, and the run goes on
            outcomes["broken"] += 1
            failures.append({"options": options, "error": f"{type(exc).__name__}: {exc}", "graph": text,
                             "traceback": traceback.format_exc(limit=3)})
            return
        verdict = outcome.verdict
        outcomes["verified" if verdict == "verified" else "refused: " + verdict.split(":", 1)[1].strip()[:80]] += 1
        if outcome.params_after < outcome.params_before:
            outcomes["verified and smaller"] += 1

    case()
    result = {"cases": sum(families.values()), "families": dict(families), "outcomes": dict(outcomes),
              "broken": outcomes["broken"], "seconds": round(time.perf_counter() - start, 1), "failures": failures[:20]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))


if __name__ == "__main__":
    main()
