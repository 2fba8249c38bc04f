"""Run an experiment grid through the training driver, one process per run, resumably.

    .venv/bin/python experiments/run_grid.py configs/experiments/refine_sp8000.yaml [--only A,B] [--list]

Every run is `python -m vq_megatron.train --config <grid.config> --set ...` with the grid's defaults and the
run's overrides, in the grid's order (round-robin over `repeats`: experiments/grid.py); its directory is
<grid.out>/<name>. A run with summary.json is skipped, so an interrupted grid resumes where it stopped.
One failed run is reported and the others go on. This script only runs; experiments/report.py makes the
tables and plots.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.data import prepare_data  # noqa: E402
from experiments.grid import Grid, RunSpec, load_grid, overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def data_settings(grid: Grid, data: dict) -> dict:
    return {"model.vocab_size": data["vocab"], "data.train_prefix": data["train"],
            "data.tokenizer_model": data["tokenizer_model"], "data.eval_sets": data["eval"],
            "data.eval_tokens": grid.data.get("eval_tokens", 65536),
            "data.cache_dir": str(grid.out / "index_cache")}


def _train(grid: Grid, name: str, settings: dict, *, exit_after: int = 0, marker: str = "summary.json",
           port: int) -> Path:
    run_dir = grid.out / name
    if (run_dir / marker).is_file():
        print(f"[grid] {name}: {marker} exists, skipped", flush=True)
        return run_dir
    logs = grid.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "vq_megatron.train", "--config", grid.config]
    for o in overrides({**settings, "training.save_dir": str(run_dir)}):
        cmd += ["--set", o]
    if exit_after:
        cmd += ["--exit-after-steps", str(exit_after)]
    print(f"[grid] {name}: training ({' '.join(cmd[3:])})", flush=True)
    began = time.time()
    log = logs / f"{name}{'' if not exit_after else f'_until{exit_after}'}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{name} failed (rc={proc.returncode}), log {log}:\n{log.read_text()[-3000:]}")
    print(f"[grid] {name}: done in {time.time() - began:.0f} s", flush=True)
    return run_dir


def _source_checkpoint(grid: Grid, base: dict, spec: RunSpec, port: int) -> Path:
    """The source run's directory with a checkpoint at the requested step (trained that far if needed)."""
    source, step = grid.run(spec.source["run"]), spec.source["step"]
    settings = {**base, **source.settings, "training.save_interval": step}
    run_dir = grid.out / source.name
    done = (run_dir / "summary.json").is_file() and step == source.steps
    if not done and not (run_dir / f"step_{step:08d}").is_dir():
        _train(grid, source.name, settings, exit_after=step, marker=f"summary_until_{step}.json", port=port)
    return run_dir / f"step_{step:08d}"


def source_settings(spec: RunSpec, checkpoint: Path, head_rows: Path) -> dict:
    """What a run with `source` adds to its overrides: the source's dense head rows to cluster (written by
    convert_head to head_rows) and/or its body weights."""
    out = {}
    if "embeddings" in spec.use:
        out["model.vq_init_embeddings"] = str(head_rows)
    if "body" in spec.use:
        out["model.init_from"] = str(checkpoint)
    return out


def run_spec(grid: Grid, data: dict, spec: RunSpec, port: int) -> None:
    base = data_settings(grid, data)
    settings = {**base, **spec.settings}
    if spec.source is not None:
        if (grid.out / spec.name / "summary.json").is_file():
            print(f"[grid] {spec.name}: summary.json exists, skipped", flush=True)
            return
        checkpoint = _source_checkpoint(grid, base, spec, port)
        emb = grid.out / f"{spec.name}.head_rows.pt"
        if "embeddings" in spec.use and not emb.is_file():
            cmd = [sys.executable, "-m", "vq_megatron.strategies.convert_head", str(checkpoint), "--out",
                   str(emb), "--vocab-size", str(data["vocab"])]
            print("[grid] $ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        settings.update(source_settings(spec, checkpoint, emb))
    _train(grid, spec.name, settings, port=port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="configs/experiments/<name>.yaml")
    p.add_argument("--only", default="", help="comma-separated run names (default: every run, in order)")
    p.add_argument("--list", action="store_true", help="print the runs and their overrides, run nothing")
    p.add_argument("--port", type=int, default=29631)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    grid = load_grid(args.grid)
    specs = [s for s in grid.runs if not s.source_only]
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in {s.name for s in grid.runs}]
        if unknown:
            p.error(f"unknown runs {unknown}")
        specs = [s for s in grid.runs if s.name in wanted]
    if args.list:
        for s in specs:
            print(f"{s.name:40s} {s.group:20s} {' '.join(overrides(s.settings))}")
        return 0
    data = prepare_data(grid.data.get("dir", "runs/experiments/data"),
                        tokenizer=grid.data.get("tokenizer", "sentencepiece"), vocab=grid.data.get("vocab", 8000))
    failed = []
    for spec in specs:
        try:
            run_spec(grid, data, spec, args.port)
        except (RuntimeError, subprocess.CalledProcessError) as err:   # one broken run must not lose the others
            print(f"[grid] {spec.name} FAILED: {err}", flush=True)
            failed.append(spec.name)
    print(f"[grid] {grid.name}: {len(specs) - len(failed)} of {len(specs)} runs finished"
          + (f"; failed: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
