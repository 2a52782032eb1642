"""How close a rank plan is to the final ranks of a full AdaLoRA run (or any two plans / run folders).

    python scripts/plan_agreement.py runs/sweep/plans/sst2-plan+lora-0.3M-s0.json runs/sweep/sst2-adalora-0.3M-s0

Prints, over the target matrices both hold: Spearman's and Kendall's rank correlation of the per-matrix ranks, the
share of total rank each puts in every matrix kind (Wq ... Wf2) and every third of the depth, and how many matrices
each leaves at rank 0. Each argument is a plan file or a finished run folder (`rankplan.read_plan` reads both).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adalora_cli.rankplan import read_plan  # noqa: E402


def shares(plan, key) -> dict[str, float]:
    total = sum(t.rank for t in plan.targets) or 1
    out: dict[str, float] = defaultdict(float)
    for t in plan.targets:
        out[key(t)] += t.rank / total
    return dict(out)


def main() -> None:
    from scipy.stats import kendalltau, spearmanr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a plan file or a finished run folder")
    parser.add_argument("b", help="another one")
    args = parser.parse_args()
    a, b = read_plan(args.a), read_plan(args.b)
    common = [name for name in a.ranks if name in b.ranks]
    if not common:
        sys.exit(f"{args.a} and {args.b} share no target matrix")
    x, y = [a.ranks[n] for n in common], [b.ranks[n] for n in common]
    print(f"{len(common)} matrices; total rank {sum(x)} vs {sum(y)}; at rank 0: {x.count(0)} vs {y.count(0)}")
    print(f"Spearman {spearmanr(x, y).statistic:.3f}, Kendall tau-b {kendalltau(x, y).statistic:.3f}")
    layers = 1 + max(t.layer for t in a.targets)
    for label, key in (("kind", lambda t: t.kind), ("depth", lambda t: f"layers {3 * t.layer // layers + 1}/3")):
        sa, sb = shares(a, key), shares(b, key)
        print(f"share of total rank by {label}: " + ", ".join(
            f"{k} {100 * sa.get(k, 0):.0f}% vs {100 * sb.get(k, 0):.0f}%" for k in sorted(set(sa) | set(sb))))


if __name__ == "__main__":
    main()
