"""Tables and plots of a finished (or partly finished) experiment grid.

    .venv/bin/python experiments/report.py configs/experiments/refine_sp8000.yaml

Reads <grid.out>/<run>/summary.json + config.json of every run that finished and writes
<grid.results>.json (every row, with its training-loss curve), .csv, _table.md and the plots the grid names
(see experiments/grid.py). The table has one section per group (% against each row's baseline); then
mean ± sample std over the seeds of every run that has several, with their means against the baseline's;
then the runs with `repeats`: one row each, the median of the repeats (and every value). With
`report: {unigram: true}` a row "unigram (no training)" gives the level of the training data's unigram.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.grid import Grid, RunSpec, load_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_SETS = (("c4", "C4"), ("wikitext2", "WT2"), ("wikitext103", "WT103"))
UNIGRAM = "unigram (no training)"


def head_label(config: dict) -> str:
    model = config["model"]
    if model["output_layer"] != "vq":
        return model["output_layer"]
    vq = model["vq"]
    if vq.get("codebook_size") == model["vocab_size"] and vq.get("map_init") == "contiguous" \
            and vq.get("per_token_bias") and not vq.get("refine_rank"):
        # K = V with the identity map: exactly a dense V x d head plus a per-token bias
        return "dense + bias" + (" bias0" if vq.get("bias_init", "zeros") == "zeros" else "")
    label = f"VQ K={vq.get('codebook_size')} {vq.get('map_init')}"
    if not vq.get("per_token_bias"):
        label += " no bias"
    elif vq.get("bias_init", "zeros") == "zeros":
        label += " bias0"
    if vq.get("refine_rank"):
        label += f" r={vq['refine_rank']}"
    return label


def _is_metric(key: str) -> bool:
    return key in ("tokens_per_s", "final_train_loss") or key.endswith("_ppl")


def _row(grid: Grid, spec: RunSpec, summary: dict, config: dict) -> dict:
    losses = summary.get("train_losses", [])
    offset = spec.source["step"] if spec.source and "body" in spec.use else 0
    row = {"run": spec.name, "entry": spec.entry, "group": spec.group, "head": head_label(config),
           "seed": config["training"]["seed"], "steps": config["training"]["steps"] + offset,
           "vocab": config["model"]["vocab_size"], "layers": config["model"]["num_layers"],
           "hidden": config["model"]["hidden_size"], "head_parameters": summary["head_parameters"],
           "tokens_per_s": round(summary.get("tokens_per_s", float("nan")), 1),
           "final_train_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
           "baseline": spec.baseline or grid.baseline, "train_losses": losses, "step_offset": offset}
    if config["model"]["output_layer"] == "vq":
        row.update({f"vq_{k}": v for k, v in config["model"]["vq"].items()})
    for key, value in sorted(summary.get("eval", {}).items()):
        if key.endswith("_ppl"):
            row[key] = round(value, 2)
    return row


def _median_row(name: str, repeats: list[dict]) -> dict:
    """The repeats of a run as one row named after it: the median of every metric, <metric>_all with every
    value in run order; the rest is the first repeat's."""
    row = {**repeats[0], "run": name, "repeats": len(repeats)}
    for key in [k for k in repeats[0] if _is_metric(k)]:
        row[f"{key}_all"] = [r[key] for r in repeats if key in r]
        row[key] = statistics.median(row[f"{key}_all"])
    return row


def _merge_repeats(rows: list[dict], repeated: set[str]) -> list[dict]:
    """Finished repeats replaced by their median row, where the first of them stood."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["run"] in repeated:
            groups.setdefault(r["entry"], []).append(r)
    out = []
    for r in rows:
        if r["run"] not in repeated:
            out.append(r)
        elif r is groups[r["entry"]][0]:
            out.append(_median_row(r["entry"], groups[r["entry"]]))
    return out


def unigram_row(grid: Grid, rows: list[dict]) -> dict | None:
    """No training: the add-one smoothed unigram distribution of the baseline run's training data, on the
    same eval windows as the models (what a head reaches from a unigram bias alone)."""
    base = next((r for r in rows if r["run"] == grid.baseline), None)
    if base is None or not (grid.out / base["run"] / "config.json").is_file():
        return None
    import numpy as np

    from vq_megatron.training.data import corpus_token_counts, eval_windows, read_meta
    from vq_megatron.training.evaluation import perplexities

    config = json.loads((grid.out / base["run"] / "config.json").read_text())
    model, data = config["model"], config["data"]
    counts = corpus_token_counts(data["train_prefix"], model["vocab_size"]).double().numpy() + 1.0
    logp = np.log(counts / counts.sum())
    row = {"run": UNIGRAM, "entry": "", "group": base["group"], "head": "unigram", "steps": 0,
           "head_parameters": None, "tokens_per_s": None, "baseline": grid.baseline, "train_losses": [],
           "step_offset": 0}
    for name, prefix in data["eval_sets"].items():
        targets = eval_windows(prefix, model["seq_length"], data["eval_tokens"])[:, 1:].reshape(-1).numpy()
        meta = read_meta(prefix)
        words = meta["words"] * targets.size / meta["tokens"] if meta.get("words") and meta.get("tokens") else None
        found = perplexities(name, float(-logp[targets].sum()), targets.size, words)
        row.update({k: round(v, 2) for k, v in found.items() if k.endswith("_ppl")})
    return row


def _relative(rows: list[dict]) -> None:
    """Head-parameter cut, speed ratio and perplexity % of every row against its baseline row."""
    by_name = {r["run"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["baseline"])
        if base is None or base is r:
            continue
        if r["head_parameters"] is not None:
            r["head_param_cut_pct"] = round(100 * (1 - r["head_parameters"] / base["head_parameters"]), 2)
        if all(v is not None and v > 0 for v in (r["tokens_per_s"], base["tokens_per_s"])):   # NaN > 0 is False
            r["speed_vs_base"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        for key in [k for k in r if k.endswith("_ppl")]:
            if key in base:
                r[key + "_vs_base_pct"] = round(100 * (r[key] / base[key] - 1), 2)


def collect(grid: Grid) -> list[dict]:
    rows = []
    for spec in grid.runs:
        run_dir = grid.out / spec.name
        if spec.source_only or not (run_dir / "summary.json").is_file():
            continue
        rows.append(_row(grid, spec, json.loads((run_dir / "summary.json").read_text()),
                         json.loads((run_dir / "config.json").read_text())))
    rows = _merge_repeats(rows, {s.name for s in grid.runs if s.repeat is not None})
    unigram = unigram_row(grid, rows) if grid.report.get("unigram") else None
    rows += [unigram] if unigram else []
    _relative(rows)
    return rows


def seed_groups(rows: list[dict]) -> list[dict]:
    """Mean ± sample std over the seeds of every run that has several (the runs of one `seeds` entry)."""
    members: dict[str, list[dict]] = {}
    for r in rows:
        if r["entry"] and "repeats" not in r:
            members.setdefault(r["entry"], []).append(r)
    out = []
    for entry, group in members.items():
        if len(group) < 2:
            continue
        agg = {"run": entry, "seeds": [m["seed"] for m in group], "n": len(group), "baseline": group[0]["baseline"]}
        for key in [f"{k}_ppl" for k, _ in EVAL_SETS] + ["tokens_per_s"]:
            values = [m[key] for m in group if m.get(key) is not None]
            if values:
                agg[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(agg)
    return out


def _fmt(value, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " / ".join(_fmt(v, key.removesuffix("_all")) for v in value)
    if key == "head_param_cut_pct":
        return f"{value:.1f}%"
    if key.endswith("_pct"):
        return f"{value:+.1f}%"
    if key == "speed_vs_base":
        return f"{value:.2f}x"
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
SEED_COLUMNS = ([("run", "run"), ("seeds", "seeds"), ("n", "n")] + [(f"{k}_ppl", f"{l} ppl") for k, l in EVAL_SETS]
                + [("tokens_per_s", "tokens/s*")])
REPEAT_COLUMNS = [("run", "run"), ("head", "head"), ("vocab", "V"), ("head_parameters", "head params"),
                  ("head_param_cut_pct", "cut"), ("repeats", "n"), ("tokens_per_s", "tokens/s (median)"),
                  ("tokens_per_s_all", "all"), ("speed_vs_base", "vs"), ("baseline", "baseline")]


def _table(columns: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    """A markdown table of the columns that have a value in some row."""
    cells = [[_fmt(r.get(k), k) for k, _ in columns] for r in rows]
    keep = [i for i in range(len(columns)) if any(c[i] for c in cells)]
    return (["| " + " | ".join(columns[i][1] for i in keep) + " |", "|" + "---|" * len(keep)]
            + ["| " + " | ".join(c[i] for i in keep) + " |" for c in cells] + [""])


def _seed_rows(rows: list[dict]) -> list[dict]:
    """The seed table: mean ± std per run, and its means against its baseline's where both have seeds."""
    groups = seed_groups(rows)
    by_run = {g["run"]: g for g in groups}
    out = []
    for g in groups:
        out.append({"run": g["run"], "seeds": ",".join(map(str, g["seeds"])), "n": g["n"],
                    **{k: "{:,.1f} ± {:,.1f}".format(*g[k]) for k in g if _is_metric(k)}})
        base = by_run.get(g["baseline"])
        if base is None or base is g:
            continue
        versus = {"run": f"{g['run']} vs {base['run']} (means)"}
        for key in [k for k in g if _is_metric(k) and k in base]:
            ratio = g[key][0] / base[key][0]
            versus[key] = f"{ratio:.2f}x" if key == "tokens_per_s" else f"{100 * (ratio - 1):+.1f}%"
        out.append(versus)
    return out


def loss_gap_rows(rows: list[dict], runs: list[str], steps: list[int], window: int = 50,
                  versus: str | None = None) -> list[dict]:
    """Training-loss gap (nats) of each run against its baseline (or `versus`, for the runs that share its
    baseline) at the given steps, both
    curves averaged over the `window` steps up to there: how the gap moves with training. A run repeated
    over seeds is compared as the mean curve of its seeds against its baseline's mean curve."""
    def curve(name):
        members = [r for r in rows if r["entry"] == name]
        if not members:
            return None, 0
        losses = [r["train_losses"] for r in members]
        length = min(len(c) for c in losses)
        return [sum(c[i] for c in losses) / len(losses) for i in range(length)], members[0]["step_offset"]

    def at(values, offset, step):
        i = step - offset                  # the loss of step s is values[s - offset - 1]
        window_values = values[max(0, i - window):i]
        return sum(window_values) / len(window_values) if 0 < i <= len(values) else None

    out = []
    for name in runs:
        mine, offset = curve(name)
        entry = next((r for r in rows if r["entry"] == name), None)
        against = versus or (entry["baseline"] if entry else None)
        reference = next((r for r in rows if r["entry"] == versus), None) if versus else None
        if entry and reference and reference["baseline"] != entry["baseline"]:
            continue   # a second reference only for the runs of its own family (same baseline)
        base, base_offset = curve(against) if against else (None, 0)
        if mine is None or base is None or name == against:
            continue
        row = {"run": name, "baseline": against, "n": sum(r["entry"] == name for r in rows)}
        for step in steps:
            a, b = at(mine, offset, step), at(base, base_offset, step)
            row[f"gap_{step}"] = None if a is None or b is None else f"{a - b:+.3f}"
        out.append(row)
    return out


def markdown(grid: Grid, rows: list[dict]) -> str:
    lines = [f"# {grid.name}", "", grid.description.strip(), "",
             "`%` columns: perplexity relative to the row named in `vs`. *tokens/s of grid runs share the "
             "machine with other jobs: not a speed comparison.", ""]
    groups = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    for group in groups:
        lines += [f"## {group or 'runs'}", ""] + _table(COLUMNS, [r for r in rows if r["group"] == group])
    seeds = _seed_rows(rows)
    if seeds:
        lines += ["## seeds (mean ± sample std)", ""] + _table(SEED_COLUMNS, seeds)
    gap = grid.plots.get("loss_gap")
    if gap:
        columns = ([("run", "run"), ("n", "seeds"), ("baseline", "vs")]
                   + [(f"gap_{s}", f"step {s:,}") for s in gap["steps"]])
        lines += [f"## training-loss gap vs steps (nats, run − baseline, mean of the {gap.get('window', 50)} steps "
                  "up to each; negative = lower loss than the baseline)", ""]
        for versus in [None, *gap.get("also_vs", [])]:
            gap_rows = loss_gap_rows(rows, gap["runs"], gap["steps"], gap.get("window", 50), versus)
            lines += _table(columns, gap_rows) if gap_rows else []      # a reference that has not run yet
    repeated = [r for r in rows if "repeats" in r]
    if repeated:
        lines += ["## repeats (median tokens/s of the round-robin repeats, every value, ratio to the baseline)",
                  ""] + _table(REPEAT_COLUMNS, repeated)
    return "\n".join(lines)


def _smooth(values, k: int = 20):
    out, window = [], []
    for v in values:
        window = (window + [v])[-k:]
        out.append(sum(window) / len(window))
    return out


def _save(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_plot(grid: Grid, by_name: dict, title: str, names: list[str]) -> Path | None:
    import matplotlib.pyplot as plt

    names = [n for n in names if n in by_name]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in names:
        losses = by_name[name]["train_losses"]
        x = [i + 1 + by_name[name]["step_offset"] for i in range(len(losses))]
        ax.plot(x, _smooth(losses), label=f"{name} ({by_name[name]['head']})", lw=1.2)
    return _save(fig, ax, Path(f"{grid.results}_loss_{title}.png"), xlabel="step",
                 ylabel="training loss (moving average of 20)", title=f"{grid.name}: {title}")


def _pareto_plot(grid: Grid, by_name: dict, pareto: dict) -> Path | None:
    import matplotlib.pyplot as plt

    metric = pareto.get("metric", "c4_ppl")
    points = [by_name[n] for n in pareto.get("runs", []) if n in by_name and metric in by_name[n]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families = {}
    for r in points:
        families.setdefault("refined" if "r=" in r["head"] else r["head"], []).append(r)
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
    ax.plot([r["head_parameters"] for r in front], [r[metric] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    return _save(fig, ax, Path(f"{grid.results}_pareto.png"), xlabel="output-layer parameters",
                 ylabel=metric.replace("_", " "), title=f"{grid.name}: perplexity against head parameters")


def _k_plot(grid: Grid, by_name: dict, spec: dict) -> Path | None:
    """Perplexity against the codebook size K, one line per series and metric; the reference row (e.g.
    dense) as a horizontal line."""
    import matplotlib.pyplot as plt

    metrics = spec.get("metrics", ["c4_ppl"])
    series = {label: sorted((by_name[n] for n in names if n in by_name), key=lambda r: r["vq_codebook_size"])
              for label, names in spec.get("series", {}).items()}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = by_name.get(spec.get("reference"))
    k_min = min(m["vq_codebook_size"] for members in series.values() for m in members)
    for metric in metrics:
        for (label, members), style in zip(series.items(), itertools.cycle(("o-", "s--", "^:", "d-."))):
            members = [m for m in members if metric in m]
            if members:
                ax.plot([m["vq_codebook_size"] for m in members], [m[metric] for m in members], style,
                        label=f"{label}, {metric}")
        if reference and metric in reference:
            ax.axhline(reference[metric], ls=":", color="gray")
            ax.text(k_min, reference[metric], f" {reference['run']} {metric}", fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    return _save(fig, ax, Path(f"{grid.results}_ppl_vs_K.png"), xlabel="codebook size K",
                 ylabel="token-level perplexity", title=f"{grid.name}: perplexity against K")


def plots(grid: Grid, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    by_name = {r["run"]: r for r in rows}
    written = [_loss_plot(grid, by_name, title, names)
               for title, names in (grid.plots.get("loss_curves") or {}).items()]
    if grid.plots.get("pareto"):
        written.append(_pareto_plot(grid, by_name, grid.plots["pareto"]))
    if grid.plots.get("ppl_vs_K"):
        written.append(_k_plot(grid, by_name, grid.plots["ppl_vs_K"]))
    return [p for p in written if p is not None]


def write(grid: Grid, rows: list[dict]) -> str:
    """<results>.json, .csv and _table.md; returns the table."""
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
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="configs/experiments/<name>.yaml")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    grid = load_grid(args.grid)
    rows = collect(grid)
    print(write(grid, rows))
    if not args.no_plots:
        try:
            for path in plots(grid, rows):
                print(f"[report] wrote {path}")
        except ImportError:
            print("[report] matplotlib missing: plots skipped (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
