"""Tables and plots of a finished (or partly finished) experiment grid.

    .venv/bin/python experiments/report.py configs/experiments/refine_sp8000.yaml

Reads <grid.out>/<run>/summary.json + config.json of every run that finished and writes
<grid.results>.json (every row, with its training-loss curve), .csv, _table.md (one table per group, %
against each row's baseline, and mean ± std over seeds where a run has several), and the plots the grid
names: loss curves, and perplexity against head parameters (the Pareto front).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.grid import Grid, load_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_SETS = (("c4", "C4"), ("wikitext2", "WT2"), ("wikitext103", "WT103"))


def head_label(config: dict) -> str:
    model = config["model"]
    if model["output_layer"] != "vq":
        return model["output_layer"]
    vq = model["vq"]
    label = f"VQ K={vq.get('codebook_size')} {vq.get('map_init')}"
    if vq.get("refine_rank"):
        label += f" r={vq['refine_rank']}"
    return label


def collect(grid: Grid) -> list[dict]:
    rows = []
    for spec in grid.runs:
        run_dir = grid.out / spec.name
        summary_path = run_dir / "summary.json"
        if spec.source_only or not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        config = json.loads((run_dir / "config.json").read_text())
        losses = summary.get("train_losses", [])
        offset = spec.source["step"] if spec.source and "body" in spec.use else 0
        row = {"run": spec.name, "group": spec.group, "head": head_label(config),
               "seed": config["training"]["seed"], "steps": config["training"]["steps"] + offset,
               "layers": config["model"]["num_layers"], "hidden": config["model"]["hidden_size"],
               "head_parameters": summary["head_parameters"],
               "tokens_per_s": round(summary.get("tokens_per_s", float("nan")), 1),
               "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
               "baseline": spec.baseline or grid.baseline, "train_losses": losses, "step_offset": offset}
        for key, value in sorted(summary.get("eval", {}).items()):
            if key.endswith("_ppl"):
                row[key] = round(value, 2)
        rows.append(row)
    by_name = {r["run"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["baseline"])
        if base is None or base is r:
            continue
        r["head_param_cut_pct"] = round(100 * (1 - r["head_parameters"] / base["head_parameters"]), 2)
        for key in [k for k in r if k.endswith("_ppl")]:
            if key in base:
                r[key + "_vs_base_pct"] = round(100 * (r[key] / base[key] - 1), 2)
    return rows


def seed_groups(grid: Grid, rows: list[dict]) -> list[dict]:
    """Mean ± sample std over the seeds of every run that has several (<name>, <name>_seed<s>, ...)."""
    by_name = {r["run"]: r for r in rows}
    out = []
    for r in rows:
        members = [r] + [by_name[n] for n in by_name if n.startswith(r["run"] + "_seed")]
        if len(members) < 2:
            continue
        agg = {"run": r["run"], "seeds": [m["seed"] for m in members], "n": len(members)}
        for key in [k for k in r if k.endswith("_ppl")]:
            values = [m[key] for m in members if key in m]
            agg[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(agg)
    return out


def _fmt(value, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if key == "head_param_cut_pct":
        return f"{value:.1f}%"
    if key.endswith("_pct"):
        return f"{value:+.1f}%"
    if key == "final_train_loss":
        return f"{value:.3f}"
    if key.endswith("word_ppl") or key in ("tokens_per_s", "head_parameters"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


COLUMNS = [("run", "run"), ("head", "head"), ("steps", "steps"), ("head_parameters", "head params"),
           ("head_param_cut_pct", "cut"), ("final_train_loss", "train loss (last 10)")]
for _key, _label in EVAL_SETS:
    COLUMNS += [(f"{_key}_ppl", f"{_label} ppl"), (f"{_key}_ppl_vs_base_pct", f"{_label} %"),
                (f"{_key}_word_ppl", f"{_label} word ppl")]
COLUMNS += [("baseline", "vs"), ("tokens_per_s", "tokens/s*")]


def markdown(grid: Grid, rows: list[dict]) -> str:
    lines = [f"# {grid.name}", "", grid.description.strip(), "",
             "`%` columns: perplexity relative to the row named in `vs`. *tokens/s of grid runs share the "
             "machine with other jobs: not a speed comparison.", ""]
    groups = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    for group in groups:
        lines += [f"## {group or 'runs'}", "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_fmt(r.get(k), k) for k, _ in COLUMNS) + " |" for r in rows if r["group"] == group]
        lines.append("")
    seeds = seed_groups(grid, rows)
    if seeds:
        lines += ["## seeds (mean ± sample std)", "", "| run | seeds | " + " | ".join(f"{l} ppl" for _, l in EVAL_SETS)
                  + " |", "|---|---|" + "---|" * len(EVAL_SETS)]
        for s in seeds:
            cells = [f"{s[f'{k}_ppl'][0]:,.1f} ± {s[f'{k}_ppl'][1]:,.1f}" if f"{k}_ppl" in s else ""
                     for k, _ in EVAL_SETS]
            lines.append(f"| {s['run']} | {','.join(map(str, s['seeds']))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _smooth(values, k: int = 20):
    out, window = [], []
    for v in values:
        window = (window + [v])[-k:]
        out.append(sum(window) / len(window))
    return out


def plots(grid: Grid, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["run"]: r for r in rows}
    written = []
    for title, names in (grid.plots.get("loss_curves") or {}).items():
        names = [n for n in names if n in by_name]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for name in names:
            losses = by_name[name]["train_losses"]
            x = [i + 1 + by_name[name]["step_offset"] for i in range(len(losses))]
            ax.plot(x, _smooth(losses), label=f"{name} ({by_name[name]['head']})", lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average of 20)")
        ax.set_title(f"{grid.name}: {title}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(f"{grid.results}_loss_{title}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    pareto = grid.plots.get("pareto")
    if pareto:
        metric = pareto.get("metric", "c4_ppl")
        points = [by_name[n] for n in pareto.get("runs", []) if n in by_name and metric in by_name[n]]
        if points:
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            families = {}
            for r in points:
                family = r["head"].split(" r=")[0] if "r=" in r["head"] else r["head"]
                kind = "refined" if "r=" in r["head"] else family
                families.setdefault(kind, []).append(r)
            for kind, members in families.items():
                ax.scatter([m["head_parameters"] for m in members], [m[metric] for m in members], label=kind, s=28)
                for m in members:
                    ax.annotate(m["head"].replace("VQ ", ""), (m["head_parameters"], m[metric]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
            front, best = [], float("inf")
            for r in sorted(points, key=lambda r: r["head_parameters"]):
                if r[metric] < best:
                    best = r[metric]
                    front.append(r)
            ax.plot([r["head_parameters"] for r in front], [r[metric] for r in front], "k--", lw=0.8,
                    label="Pareto front")
            ax.set_xscale("log")
            ax.set_xlabel("output-layer parameters")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{grid.name}: perplexity against head parameters")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            path = Path(f"{grid.results}_pareto.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="configs/experiments/<name>.yaml")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)
    grid = load_grid(args.grid)
    rows = collect(grid)
    grid.results.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{grid.results}.json").write_text(json.dumps(rows, indent=1))
    flat = [{k: v for k, v in r.items() if k != "train_losses"} for r in rows]
    keys: list[str] = []
    for r in flat:
        keys += [k for k in r if k not in keys]
    with open(f"{grid.results}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    table = markdown(grid, rows)
    Path(f"{grid.results}_table.md").write_text(table + "\n")
    print(table)
    if not args.no_plots:
        try:
            for path in plots(grid, rows):
                print(f"[report] wrote {path}")
        except ImportError:
            print("[report] matplotlib missing: plots skipped (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
