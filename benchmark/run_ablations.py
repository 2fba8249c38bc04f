"""Issue 6: dense vs VQ-Logits (and adaptive softmax) ablations on C4, at CPU scale.

Trains the same small megatron-core GPT (same body, steps, tokens, seed) through the training driver
(`python -m vq_megatron.train`, one process, TP=1) once per grid entry, then writes
docs/results/ablations.{csv,json}, docs/results/tables.md and PNG plots. Runs whose summary.json exists
are skipped, so an interrupted grid resumes where it stopped.

Data (from ../shared/data, see its README): training = C4 train sample (1,000 docs) + the first 1,500
documents of the C4 validation sample; C4 evaluation = the last 500 validation documents; WikiText-2 and
WikiText-103 valid (token- and word-level perplexity). Tokenizer: sentencepiece (--vocab 8000 default,
--vocab 32000 for the paper's size) or GPT-2 BPE (--tokenizer gpt2, V=50257).

    .venv/bin/python benchmark/run_ablations.py                 # the default grid (see GROUPS)
    .venv/bin/python benchmark/run_ablations.py --only dense,vq_K512_freq_bias --steps 50
    .venv/bin/python benchmark/run_ablations.py --speed         # tokens/s dense vs VQ at the chosen vocab
    .venv/bin/python benchmark/run_ablations.py --report-only   # tables and plots from finished runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable

# The VQ head every other VQ entry varies one thing of (the recommended default, see docs/RESULTS.md).
BASE_VQ = {"codebook_size": 512, "map_init": "frequency", "codebook_init": "normal",
           "per_token_bias": True, "bias_init": "unigram"}


def vq(**changes) -> dict:
    return {**BASE_VQ, **changes}


def grid(args) -> list[dict]:
    """Entries in priority order: name, group, head ('dense'|'vq'|'adaptive'), vq options, seed, kind."""
    seeds = [int(s) for s in args.seeds.split(",")]
    g = [dict(name="dense", group="baseline", head="dense"),
         dict(name="vq_K512_freq_bias", group="headline", head="vq", vq=vq())]
    g += [dict(name=f"vq_K{k}_freq_bias", group="K sweep", head="vq", vq=vq(codebook_size=k))
          for k in (256, 1024, 2048)]
    g += [dict(name=f"vq_K512_{m}_bias", group="map init", head="vq", vq=vq(map_init=m))
          for m in ("random", "contiguous")]
    g += [dict(name="vq_K512_freq_nobias", group="bias", head="vq",
               vq=vq(per_token_bias=False, bias_init="zeros")),
          dict(name="adaptive", group="peer", head="adaptive"),
          dict(name="vq_K512_twostage_kmeans_bias", group="two-stage", head="vq", kind="two_stage",
               vq=vq(map_init="kmeans", codebook_init="kmeans")),
          dict(name="vq_K512_recluster_keep", group="recluster", head="vq",
               vq=vq(recluster_interval=args.recluster_interval))]
    g += [dict(name=f"dense_seed{seeds[0]}", group="seeds", head="dense", seed=seeds[0]),
          dict(name=f"vq_K512_freq_bias_seed{seeds[0]}", group="seeds", head="vq", vq=vq(), seed=seeds[0])]
    g += [dict(name="vq_K512_recluster_reinit", group="recluster", head="vq",
               vq=vq(recluster_interval=args.recluster_interval, recluster_reinit_codebook=True)),
          dict(name="vq_K512_freq_bias0", group="bias", head="vq", vq=vq(bias_init="zeros")),
          dict(name="vq_K64_freq_bias", group="K sweep", head="vq", vq=vq(codebook_size=64)),
          dict(name="vq_K256_freq_nobias", group="K sweep (no bias)", head="vq",
               vq=vq(codebook_size=256, per_token_bias=False, bias_init="zeros")),
          dict(name="vq_K128_freq_nobias", group="K sweep (no bias)", head="vq",
               vq=vq(codebook_size=128, per_token_bias=False, bias_init="zeros")),
          dict(name="vq_K512_posthoc_kmeans_bias0", group="post-hoc", head="vq", kind="posthoc",
               vq=vq(map_init="kmeans", codebook_init="kmeans", bias_init="zeros")),
          dict(name="vq_K512_twostage_kmeans_bias0", group="two-stage", head="vq", kind="two_stage",
               vq=vq(map_init="kmeans", codebook_init="kmeans", bias_init="zeros"))]
    for s in seeds[1:]:
        g += [dict(name=f"dense_seed{s}", group="seeds", head="dense", seed=s),
              dict(name=f"vq_K512_freq_bias_seed{s}", group="seeds", head="vq", vq=vq(), seed=s)]
    if args.long_steps:
        g += [dict(name=f"dense_long{args.long_steps}", group="long", head="dense", steps=args.long_steps),
              dict(name=f"vq_K512_freq_bias_long{args.long_steps}", group="long", head="vq", vq=vq(),
                   steps=args.long_steps)]
    for entry in g:
        entry.setdefault("seed", args.seed)
        entry.setdefault("kind", "train")
    return g


# ------------------------------------------------------------------------------------------- data
def prepare_data(args) -> dict:
    """Tokenize once into args.data_dir; returns the prefixes and the vocabulary size."""
    d = Path(args.data_dir)
    d.mkdir(parents=True, exist_ok=True)
    c4 = SHARED / "c4"
    train_in = [str(c4 / "c4-train.00000-of-01024.first1000.jsonl.gz"), str(c4 / "c4-validation.sample2000.jsonl.gz")]
    if args.tokenizer == "gpt2":
        vocab, tok = 50257, ["--tokenizer", "gpt2", "--gpt2-vocab", str(SHARED / "gpt2" / "gpt2-vocab.json.gz"),
                             "--gpt2-merges", str(SHARED / "gpt2" / "gpt2-merges.txt")]
        tag, sp_model = "gpt2", ""
    else:
        vocab, tag = args.vocab, f"sp{args.vocab}"
        sp_model = str(d / f"c4_{tag}.model")
        tok = ["--sp-model", sp_model]
    prep = [PY, "-m", "vq_megatron.data.prepare", "--workers", "2", "--no-progress"]
    out = {"vocab": vocab, "tokenizer_model": sp_model, "train": str(d / f"c4_train_{tag}"), "eval": {}}
    if not Path(out["train"] + ".idx").is_file():
        extra = (tok if args.tokenizer == "gpt2" else
                 ["--train-sp", "--vocab-size", str(vocab), "--sp-model-prefix", sp_model[:-len(".model")]])
        _call(prep + ["--input", *train_in, "--max-docs", "2500", "--output-prefix", out["train"], *extra])
    evals = {"c4": (["--input", train_in[1], "--skip-docs", "1500"]),
             "wikitext2": ["--input", str(SHARED / "wikitext-2" / "wiki.valid.tokens.gz")],
             "wikitext103": ["--input", str(SHARED / "wikitext-103" / "wiki.valid.tokens.gz")]}
    for name, inputs in evals.items():
        prefix = str(d / f"{name}_eval_{tag}")
        if not Path(prefix + ".idx").is_file():
            _call(prep + inputs + ["--output-prefix", prefix, *tok])
        out["eval"][name] = prefix
    return out


def _call(cmd, log=None, env=None):
    print("[ablations] $ " + " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = Path(log).read_text()[-3000:]
        raise RuntimeError(f"command failed (rc={proc.returncode}), log {log}:\n{tail}")


# ------------------------------------------------------------------------------------------- runs
def base_overrides(args, data: dict, steps: int, seed: int) -> list[str]:
    sets = {
        "parallel.tensor_parallel": 1, "model.vocab_size": data["vocab"],
        "model.num_layers": args.layers, "model.hidden_size": args.hidden, "model.seq_length": args.seq,
        "data.train_prefix": data["train"], "data.tokenizer_model": data["tokenizer_model"],
        "data.eval_sets": "{" + ", ".join(f"{k}: {v}" for k, v in data["eval"].items()) + "}",
        "data.eval_tokens": args.eval_tokens, "data.cache_dir": str(Path(args.out) / "index_cache"),
        "optim.warmup_steps": args.warmup,
        "training.steps": steps, "training.micro_batch_size": args.micro_batch,
        "training.global_batch_size": args.global_batch, "training.seed": seed,
        "training.eval_interval": 0, "training.save_interval": 0, "training.keep_last": 1,
        "training.log_interval": 10,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def head_overrides(entry: dict) -> list[str]:
    out = [f"model.output_layer={entry['head']}"]
    if entry["head"] == "vq":
        out.append("model.vq=" + json.dumps(entry["vq"]))
    return out


def train(args, name: str, overrides: list[str], *, exit_after: int = 0, marker: str = "summary.json") -> Path:
    run_dir = Path(args.out) / name
    if (run_dir / marker).is_file():
        print(f"[ablations] {name}: {marker} exists, skipped", flush=True)
        return run_dir
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(args.port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [PY, "-m", "vq_megatron.train", "--config", args.config]
    for o in overrides + [f"training.save_dir={run_dir}"]:
        cmd += ["--set", o]
    if exit_after:
        cmd += ["--exit-after-steps", str(exit_after)]
    began = time.time()
    _call(cmd, log=logs / f"{name}.log", env=env)
    print(f"[ablations] {name}: done in {time.time() - began:.0f} s", flush=True)
    return run_dir


def run_entry(args, data: dict, entry: dict) -> None:
    name, steps = entry["name"], entry.get("steps", args.steps)
    base = base_overrides(args, data, steps, entry["seed"])
    if entry["kind"] == "train":
        train(args, name, base + head_overrides(entry))
        return
    out = Path(args.out)
    if entry["kind"] == "two_stage":
        # stage 1: the dense run's first W steps (same schedule as the dense baseline), checkpointed
        w = args.warmup_dense
        warm = train(args, f"dense_warmup{w}_seed{entry['seed']}",
                     base + ["model.output_layer=dense"], exit_after=w, marker=f"summary_until_{w}.json")
        source, steps = warm, steps - w          # same total steps / tokens as every other run
    else:  # posthoc: compress the finished dense baseline, then a short VQ fine-tune
        source, steps = out / "dense", args.posthoc_steps
    emb = out / f"{name}.emb.pt"
    if not emb.is_file():
        _call([PY, "-m", "vq_megatron.strategies.convert_head", str(source), "--out", str(emb),
               "--vocab-size", str(data["vocab"])])
    extra = [f"model.vq_init_embeddings={emb}", f"model.init_from={source}", f"training.steps={steps}"]
    if entry["kind"] == "posthoc":
        extra += [f"optim.warmup_steps={max(1, steps // 4)}"]
    train(args, name, base + head_overrides(entry) + extra)


# ------------------------------------------------------------------------------------------- report
def collect(args, entries) -> list[dict]:
    rows = []
    for e in entries:
        path = Path(args.out) / e["name"] / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        cfg = json.loads((path.parent / "config.json").read_text())
        losses = s["train_losses"]
        row = {"run": e["name"], "group": e["group"], "output_layer": s["output_layer"], "seed": e["seed"],
               "steps": cfg["training"]["steps"], "head_parameters": s["head_parameters"],
               "tokens_per_s": round(s.get("tokens_per_s", float("nan")), 1),
               "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
        if e["head"] == "vq":
            row.update({f"vq_{k}": v for k, v in cfg["model"]["vq"].items()})
        for key, value in sorted(s.get("eval", {}).items()):
            if key.endswith("_ppl"):
                row[key] = round(value, 2)
        row["train_losses"] = losses
        row["step_offset"] = args.warmup_dense if e["kind"] == "two_stage" else 0
        rows.append(row)
    uni = unigram_reference(args)
    if uni:
        rows.append(uni)
    base = next((r for r in rows if r["run"] == "dense"), None)
    for r in rows:
        if base is None:
            break
        if r["head_parameters"] is not None:
            r["head_param_cut_pct"] = round(100 * (1 - r["head_parameters"] / base["head_parameters"]), 2)
            r["speed_vs_dense"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        for key in [k for k in r if k.endswith("_ppl")]:
            if key in base:
                r[key + "_vs_dense_pct"] = round(100 * (r[key] / base[key] - 1), 2)
    return rows


def unigram_reference(args) -> dict | None:
    """No training: the add-one smoothed unigram distribution of the training data, evaluated on the same
    eval windows as the models (the level a head reaches from its unigram bias alone)."""
    import math

    import numpy as np

    from vq_megatron.training.data import corpus_token_counts, eval_windows, read_meta

    d, tag = Path(args.data_dir), args.tag
    train = d / f"c4_train_{tag}"
    if not Path(str(train) + ".idx").is_file():
        return None
    meta = read_meta(str(train))
    counts = corpus_token_counts(str(train), meta["vocab_size"]).double().numpy() + 1.0
    logp = np.log(counts / counts.sum())
    row = {"run": "unigram (no training)", "group": "reference", "output_layer": "unigram", "seed": None,
           "steps": 0, "head_parameters": None, "tokens_per_s": None, "final_train_loss": None, "train_losses": []}
    for name in ("c4", "wikitext2", "wikitext103"):
        prefix = str(d / f"{name}_eval_{tag}")
        if not Path(prefix + ".idx").is_file():
            continue
        targets = eval_windows(prefix, args.seq, args.eval_tokens)[:, 1:].reshape(-1).numpy()
        nll = float(-logp[targets].sum())
        row[f"{name}_ppl"] = round(math.exp(nll / targets.size), 2)
        words, tokens = read_meta(prefix).get("words"), read_meta(prefix).get("tokens")
        if words and tokens:
            row[f"{name}_word_ppl"] = round(math.exp(nll / (words * targets.size / tokens)), 2)
    return row


def write_report(args, rows: list[dict]) -> None:
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = args.results_stem
    (res / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    flat = [{k: v for k, v in r.items() if k != "train_losses"} for r in rows]
    keys = []
    for r in flat:
        keys += [k for k in r if k not in keys]
    with open(res / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    cols = [("run", "run"), ("head_parameters", "head params"), ("head_param_cut_pct", "cut %"),
            ("tokens_per_s", "tokens/s"), ("speed_vs_dense", "vs dense"),
            ("final_train_loss", "train loss (last 10)"),
            ("c4_ppl", "C4 ppl"), ("c4_ppl_vs_dense_pct", "C4 %"), ("c4_word_ppl", "C4 word ppl"),
            ("wikitext2_ppl", "WT2 ppl"), ("wikitext2_ppl_vs_dense_pct", "WT2 %"),
            ("wikitext2_word_ppl", "WT2 word ppl"), ("wikitext103_ppl", "WT103 ppl"),
            ("wikitext103_ppl_vs_dense_pct", "WT103 %"), ("wikitext103_word_ppl", "WT103 word ppl")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in flat:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k, _ in cols) + " |")
    lines += ["", _seed_table(flat)]
    (res / f"{stem}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        _plots(res, stem, rows)
    except ImportError:
        print("[ablations] matplotlib missing: plots skipped (pip install matplotlib)")


def _fmt(v, key=""):
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if key == "head_param_cut_pct":
        return f"{v:.1f}%"
    if key.endswith("_pct"):
        return f"{v:+.1f}%"
    if key == "speed_vs_dense":
        return f"{v:.2f}x"
    if key == "final_train_loss":
        return f"{v:.3f}"
    if key.endswith("word_ppl") or key == "tokens_per_s":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}"


def _seed_table(flat: list[dict]) -> str:
    """Mean ± sample std over seeds of the headline pair (dense vs the default VQ head)."""
    import statistics

    groups = {"dense": [r for r in flat if r["run"] == "dense" or r["run"].startswith("dense_seed")],
              "vq_K512_freq_bias": [r for r in flat if r["run"] == "vq_K512_freq_bias"
                                    or r["run"].startswith("vq_K512_freq_bias_seed")]}
    out = ["| head (seeds) | n | C4 ppl | WT2 ppl | WT103 ppl | tokens/s |", "|---|---|---|---|---|---|"]
    means = {}
    for name, rows in groups.items():
        if not rows:
            continue
        cells = []
        for key in ("c4_ppl", "wikitext2_ppl", "wikitext103_ppl", "tokens_per_s"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            m = statistics.mean(vals)
            means[(name, key)] = m
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{m:,.1f} ± {sd:,.1f}")
        seeds = ",".join(str(r["seed"]) for r in rows)
        out.append(f"| {name} ({seeds}) | {len(rows)} | " + " | ".join(cells) + " |")
    if ("dense", "c4_ppl") in means and ("vq_K512_freq_bias", "c4_ppl") in means:
        out.append("| VQ vs dense (means) | | " + " | ".join(
            f"{100 * (means[('vq_K512_freq_bias', k)] / means[('dense', k)] - 1):+.1f}%"
            for k in ("c4_ppl", "wikitext2_ppl", "wikitext103_ppl")) +
            f" | {means[('vq_K512_freq_bias', 'tokens_per_s')] / means[('dense', 'tokens_per_s')]:.2f}x |")
    return "\n".join(out)


def _smooth(values, k=10):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def _plots(res: Path, stem: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["run"]: r for r in rows}
    short = ("dense", "vq_K512_freq_bias", "vq_K512_freq_nobias", "vq_K512_random_bias", "adaptive",
             "vq_K512_twostage_kmeans_bias", "vq_K512_recluster_keep")
    long = tuple(r["run"] for r in rows if r["group"] == "long")
    for suffix, names in (("loss_curves", short), ("loss_curves_long", long)):
        names = [n for n in names if n in by]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            losses = by[name]["train_losses"]
            x = [i + 1 + by[name].get("step_offset", 0) for i in range(len(losses))]
            ax.plot(x, _smooth(losses), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average of 10)")
        ax.set_title(f"Training loss, dense vs VQ-Logits heads (C4, {stem})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(res / f"{stem}_{suffix}.png", dpi=110)
        plt.close(fig)

    ks = sorted((r["vq_codebook_size"], r) for r in rows
                if r["run"] in {f"vq_K{k}_freq_bias" for k in (64, 128, 256, 512, 1024, 2048)})
    ks_nb = sorted((r["vq_codebook_size"], r) for r in rows
                   if r["run"] in {f"vq_K{k}_freq_nobias" for k in (128, 256, 512, 1024, 2048)})
    if ks:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for metric, label in (("c4_ppl", "C4"), ("wikitext103_ppl", "WikiText-103")):
            ax.plot([k for k, _ in ks], [r.get(metric) for _, r in ks], "o-", label=f"VQ + bias, {label}")
            if ks_nb:
                ax.plot([k for k, _ in ks_nb], [r.get(metric) for _, r in ks_nb], "s--",
                        label=f"VQ no bias, {label}")
            if "dense" in by and metric in by["dense"]:
                ax.axhline(by["dense"][metric], ls=":", color="gray")
                ax.text(ks[0][0], by["dense"][metric], f" dense {label}", fontsize=8, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_ylabel("token-level perplexity")
        ax.set_title("Perplexity vs K (frequency map)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(res / f"{stem}_ppl_vs_K.png", dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------------------- speed
def speed(args, data: dict) -> None:
    """tokens/s of dense vs VQ (and adaptive) at this vocabulary: short runs, no evaluation."""
    entries = [dict(name=f"speed_{args.tag}_dense", head="dense"),
               dict(name=f"speed_{args.tag}_vq", head="vq", vq=vq(codebook_size=1024)),
               dict(name=f"speed_{args.tag}_vq_nobias", head="vq",
                    vq=vq(codebook_size=1024, per_token_bias=False, bias_init="zeros")),
               dict(name=f"speed_{args.tag}_adaptive", head="adaptive")]
    import statistics

    measured = {e["name"]: [] for e in entries}
    heads = {}
    for rep in range(args.speed_repeats):
        for e in entries:
            base = base_overrides(args, data, args.speed_steps, args.seed)
            base = [o for o in base if not o.startswith("data.eval_sets=")] + ["data.eval_sets={}"]
            run = train(args, f"{e['name']}_r{rep}", base + head_overrides(e))
            s = json.loads((run / "summary.json").read_text())
            measured[e["name"]].append(round(s["tokens_per_s"], 1))
            heads[e["name"]] = s["head_parameters"]
    rows = [{"run": name, "vocab": data["vocab"], "head_parameters": heads[name],
             "tokens_per_s": statistics.median(vals), "tokens_per_s_all": vals}
            for name, vals in measured.items()]
    for r in rows:
        r["speed_vs_dense"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        r["head_param_cut_pct"] = round(100 * (1 - r["head_parameters"] / rows[0]["head_parameters"]), 2)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"speed_{args.tag}.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/c4_small.yaml")
    p.add_argument("--tokenizer", choices=("sentencepiece", "gpt2"), default="sentencepiece")
    p.add_argument("--vocab", type=int, default=8000, help="sentencepiece vocabulary (8000; 32000 as in the paper)")
    p.add_argument("--out", default="runs/ablations", help="run directories, logs, data")
    p.add_argument("--data-dir", default="", help="tokenized data (default OUT/data)")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="LR warm-up steps")
    p.add_argument("--warmup-dense", type=int, default=50, help="two-stage: dense steps before VQ")
    p.add_argument("--posthoc-steps", type=int, default=50, help="post-hoc compression: VQ fine-tune steps")
    p.add_argument("--recluster-interval", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=16384, help="cap per eval set (0 = all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", default="2,3", help="extra seeds of the headline pair")
    p.add_argument("--only", default="", help="comma-separated run names (default: the whole grid)")
    p.add_argument("--skip", default="", help="comma-separated run names to leave out")
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--speed", action="store_true", help="only the tokens/s comparison (no eval)")
    p.add_argument("--speed-steps", type=int, default=30)
    p.add_argument("--speed-repeats", type=int, default=3, help="round-robin repeats; the median is reported")
    p.add_argument("--long-steps", type=int, default=600, help="steps of the longer dense/VQ pair (0: none)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    args.tag = "gpt2" if args.tokenizer == "gpt2" else f"sp{args.vocab}"
    args.data_dir = args.data_dir or str(Path(args.out) / "data")
    args.results_stem = "ablations" if args.tag == "sp8000" else f"ablations_{args.tag}"
    if args.tag != "sp8000" and args.out == "runs/ablations":
        args.out = f"runs/ablations_{args.tag}"
        args.data_dir = str(Path(args.out) / "data")
    entries = grid(args)
    if args.only:
        keep = set(args.only.split(","))
        entries = [e for e in entries if e["name"] in keep]
    if args.skip:
        entries = [e for e in entries if e["name"] not in set(args.skip.split(","))]
    if not args.report_only:
        data = prepare_data(args)
        if args.speed:
            speed(args, data)
            return 0
        for e in entries:
            try:
                run_entry(args, data, e)
            except RuntimeError as err:   # keep going: one broken entry must not lose the others
                print(f"[ablations] {e['name']} FAILED: {err}", flush=True)
    write_report(args, collect(args, grid(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
