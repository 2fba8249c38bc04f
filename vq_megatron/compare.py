"""Side-by-side table of finished runs: `python -m vq_megatron.compare RUN_DIR [RUN_DIR ...] [--out PREFIX]`.

Reads each run's summary.json (written by the training driver) and prints output-layer parameters,
training throughput, final training loss and evaluation perplexities; the first run is the baseline for
the relative columns. Writes PREFIX.csv and PREFIX.md when --out is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

__all__ = ["load_summaries", "comparison_rows", "main"]


def load_summaries(run_dirs) -> list[tuple[str, dict]]:
    out = []
    for run in map(Path, run_dirs):
        path = run / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: did the run in {run} finish?")
        out.append((run.name, json.loads(path.read_text())))
    return out


def _pct(value, base):
    return f"{100.0 * (value / base - 1.0):+.1f}%" if value is not None and base else "n/a"


def comparison_rows(summaries) -> list[dict]:
    base = summaries[0][1]
    eval_keys = sorted({k for _, s in summaries for k in s.get("eval", {}) if k.endswith("ppl")})
    rows = []
    for name, s in summaries:
        row = {
            "run": name, "output_layer": s["output_layer"], "head_params": s["head_parameters"],
            "head_params_vs_base": _pct(s["head_parameters"], base["head_parameters"]),
            "tokens_per_s": round(s.get("tokens_per_s", float("nan")), 1),
            "speed_vs_base": (f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                              if s.get("tokens_per_s") and base.get("tokens_per_s") else "n/a"),
            "final_train_loss": round(s["train_losses"][-1], 4) if s.get("train_losses") else None,
        }
        for key in eval_keys:
            value = s.get("eval", {}).get(key)
            row[key] = round(value, 2) if value is not None else None
            row[f"{key}_vs_base"] = _pct(value, base.get("eval", {}).get(key))
        rows.append(row)
    return rows


def _markdown(rows) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vq_megatron.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (training.save_dir); the first is the baseline")
    p.add_argument("--out", default=None, help="write the table to OUT.csv and OUT.md")
    args = p.parse_args(argv)
    rows = comparison_rows(load_summaries(args.runs))
    table = _markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        with out.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
