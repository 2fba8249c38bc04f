"""experiments/report.py on fake run directories, written as the training driver writes them."""

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))   # experiments/ is a folder of scripts at the repository root, not installed

from experiments import report  # noqa: E402
from experiments.grid import load_grid, overrides  # noqa: E402
from vq_megatron.training.config import load_run_config  # noqa: E402

GRID = """
description: fake
out: {out}
results: {results}
baseline: dense
templates:
  vq: &vq {{codebook_size: 64, map_init: frequency, per_token_bias: true, bias_init: unigram}}
defaults: {{training.steps: 20, model.seq_length: 4, data.eval_tokens: 64}}
runs:
  - {{name: dense, group: baseline, seeds: [1234, 2, 3], set: {{model.output_layer: dense}}}}
  - {{name: vq, group: heads, seeds: [1234, 2, 3], set: {{model.output_layer: vq, model.vq: *vq}}}}
  - {{name: vq_K128, group: heads, set: {{model.output_layer: vq, model.vq: {{<<: *vq, codebook_size: 128}}}}}}
  - {{name: never_ran, group: heads, set: {{model.output_layer: adaptive}}}}
  - {{name: timed_dense, group: speed, repeats: 3, set: {{model.output_layer: dense}}}}
  - {{name: timed_vq, group: speed, repeats: 3, baseline: timed_dense, set: {{model.output_layer: vq, model.vq: *vq}}}}
plots:
  loss_curves: {{heads: [dense, vq]}}
  ppl_vs_K: {{metrics: [c4_ppl], reference: dense, series: {{VQ: [vq, vq_K128]}}}}
"""
# run -> (head parameters, tokens/s, C4 ppl); no run has WikiText
MEASURED = {"dense": (1000, 100.0, 900.0), "dense_seed2": (1000, 120.0, 1000.0), "dense_seed3": (1000, 110.0, 950.0),
            "vq": (100, 300.0, 720.0), "vq_seed2": (100, 330.0, 725.0), "vq_seed3": (100, 310.0, 717.0),
            "vq_K128": (150, 250.0, 650.0),
            "timed_dense_r0": (1000, 90.0, None), "timed_dense_r1": (1000, 80.0, None),
            "timed_dense_r2": (1000, 100.0, None),
            "timed_vq_r0": (100, 200.0, None), "timed_vq_r1": (100, 260.0, None), "timed_vq_r2": (100, 240.0, None)}


def fake_run(run_dir: Path, settings: dict, measured: tuple) -> None:
    """config.json and summary.json with the trainer's keys (vq_megatron/training/trainer.py)."""
    head_parameters, tokens_per_s, c4_ppl = measured
    cfg = load_run_config(ROOT / "configs" / "c4_small.yaml", overrides(settings))
    losses = [9.0 - 0.1 * i for i in range(cfg.training.steps)]
    summary = {"output_layer": cfg.model.output_layer, "head_parameters": head_parameters, "skipped_microbatches": 0,
               "steps_run": list(range(1, len(losses) + 1)), "train_losses": losses, "final_step": len(losses),
               "tokens_per_s": tokens_per_s,
               "eval": {} if c4_ppl is None else {"c4_loss": math.log(c4_ppl), "c4_ppl": c4_ppl,
                                                  "c4_word_ppl": 10 * c4_ppl}}
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(out=tmp_path / "runs", results=tmp_path / "results" / "fake"))
    grid = load_grid(path)
    for spec in grid.runs:
        if spec.name in MEASURED:
            fake_run(grid.out / spec.name, spec.settings, MEASURED[spec.name])
    return grid


def by_run(rows):
    return {r["run"]: r for r in rows}


def test_rows_against_the_baseline(grid):
    rows = by_run(report.collect(grid))
    assert "never_ran" not in rows and rows["dense"]["baseline"] == "dense"
    assert "c4_ppl_vs_base_pct" not in rows["dense"]
    vq = rows["vq_seed2"]
    assert vq["c4_ppl_vs_base_pct"] == round(100 * (725.0 / 900.0 - 1), 2)
    assert vq["c4_word_ppl_vs_base_pct"] == vq["c4_ppl_vs_base_pct"]
    assert vq["head_param_cut_pct"] == 90.0 and vq["speed_vs_base"] == 3.3
    assert (vq["seed"], vq["steps"], vq["head"], vq["vq_codebook_size"]) == (2, 20, "VQ K=64 frequency", 64)
    assert vq["final_train_loss"] == round(statistics.mean(9.0 - 0.1 * i for i in range(10, 20)), 4)


def test_table_columns(grid):
    table = report.markdown(grid, report.collect(grid))
    heads = table.split("## heads")[1].split("##")[0].strip().splitlines()
    assert heads[0] == ("| run | head | steps | head params | cut | train loss (last 10) | C4 ppl | C4 % | "
                        "C4 word ppl | vs | tokens/s* |")      # no WikiText column: no run has it
    assert heads[3] == ("| vq_seed2 | VQ K=64 frequency | 20 | 100 | 90.0% | 7.550 | 725.0 | -19.4% | 7,250 | dense "
                        "| 330 |")
    assert [line.split(" | ")[0] for line in heads[2:]] == ["| vq", "| vq_seed2", "| vq_seed3", "| vq_K128"]


def test_seed_groups_mean_and_sample_std(grid):
    rows = report.collect(grid)
    groups = by_run(report.seed_groups(rows))
    assert set(groups) == {"dense", "vq"}       # vq_K128 has one seed, repeats are not seeds
    dense = groups["dense"]
    assert (dense["seeds"], dense["n"]) == ([1234, 2, 3], 3)
    assert dense["c4_ppl"] == (statistics.mean([900.0, 1000.0, 950.0]), statistics.stdev([900.0, 1000.0, 950.0]))
    assert dense["tokens_per_s"] == (110.0, 10.0)
    table = report.markdown(grid, rows).split("## seeds (mean ± sample std)")[1].split("##")[0].strip().splitlines()
    assert table[0] == "| run | seeds | n | C4 ppl | tokens/s* |"
    assert table[2] == "| dense | 1234,2,3 | 3 | 950.0 ± 50.0 | 110.0 ± 10.0 |"
    vq_mean = statistics.mean([720.0, 725.0, 717.0])
    assert table[4] == f"| vq vs dense (means) |  |  | {100 * (vq_mean / 950.0 - 1):+.1f}% | {313.33 / 110:.2f}x |"


def test_repeats_give_one_median_row(grid):
    rows = report.collect(grid)
    timed = by_run(rows)["timed_vq"]
    assert not any(r["run"].startswith("timed_vq_r") for r in rows)
    assert (timed["repeats"], timed["tokens_per_s"], timed["tokens_per_s_all"]) == (3, 240.0, [200.0, 260.0, 240.0])
    assert timed["speed_vs_base"] == round(240.0 / 90.0, 3) and timed["head_param_cut_pct"] == 90.0
    assert [r["run"] for r in rows if r["group"] == "speed"] == ["timed_dense", "timed_vq"]
    table = report.markdown(grid, rows).split("## repeats")[1].splitlines()
    assert table[2:6] == ["| run | head | V | head params | cut | n | tokens/s (median) | all | vs | baseline |",
                          "|---|---|---|---|---|---|---|---|---|---|",
                          "| timed_dense | dense | 8,000 | 1,000 | 0.0% | 3 | 90 | 90 / 80 / 100 | 0.90x | dense |",
                          "| timed_vq | VQ K=64 frequency | 8,000 | 100 | 90.0% | 3 | 240 | 200 / 260 / 240 | 2.67x "
                          "| timed_dense |"]


def test_unfinished_repeats_give_the_median_of_those_done(grid):
    for name in ("timed_vq_r1", "timed_vq_r2"):
        (grid.out / name / "summary.json").unlink()
    timed = by_run(report.collect(grid))["timed_vq"]
    assert (timed["repeats"], timed["tokens_per_s"]) == (1, 200.0)


def _indexed(prefix: Path, docs: list[list[int]], words: int | None = None) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    if words:
        Path(f"{prefix}.meta.json").write_text(json.dumps({"words": words, "tokens": sum(map(len, docs))}))
    return str(prefix)


def test_unigram_row(grid, tmp_path):
    """The add-one unigram of the baseline's training data, on its eval windows (seq 4, cap 64 tokens)."""
    train = _indexed(tmp_path / "train", [[0, 1, 1, 2] * 5, [3, 3, 3]])
    c4 = _indexed(tmp_path / "c4", [[1, 2, 3, 0, 5] * 20], words=50)
    config = grid.out / "dense" / "config.json"
    raw = json.loads(config.read_text())
    raw["data"].update(train_prefix=train, eval_sets={"c4": c4})
    config.write_text(json.dumps(raw))
    grid.report["unigram"] = True
    unigram = by_run(report.collect(grid))[report.UNIGRAM]
    counts = np.ones(raw["model"]["vocab_size"])
    np.add.at(counts, [0, 1, 1, 2] * 5 + [3, 3, 3], 1)
    logp = np.log(counts / counts.sum())
    targets = np.array([1, 2, 3, 0, 5] * 20)[1:65]          # 16 windows of 4 predicted tokens
    nll = -logp[targets].sum()
    assert unigram["c4_ppl"] == round(math.exp(nll / 64), 2)
    assert unigram["c4_word_ppl"] == round(math.exp(nll / (50 * 64 / 100)), 2)
    assert unigram["c4_ppl_vs_base_pct"] == round(100 * (unigram["c4_ppl"] / 900.0 - 1), 2)
    assert unigram["group"] == "baseline" and unigram["head_parameters"] is None


def test_write(grid):
    table = report.write(grid, report.collect(grid))
    prefix = str(grid.results)
    assert Path(f"{prefix}_table.md").read_text() == table + "\n"
    rows = json.loads(Path(f"{prefix}.json").read_text())
    assert rows[0]["train_losses"] and "train_losses" not in Path(f"{prefix}.csv").read_text().splitlines()[0]


def test_plots(grid):
    pytest.importorskip("matplotlib")
    grid.results.parent.mkdir(parents=True)
    written = report.plots(grid, report.collect(grid))
    assert sorted(p.name for p in written) == ["fake_loss_heads.png", "fake_ppl_vs_K.png"]


def test_loss_gap_rows_average_seeds_and_windows():
    def row(run, entry, losses, baseline="dense", offset=0):
        return {"run": run, "entry": entry, "baseline": baseline, "train_losses": losses, "step_offset": offset}

    rows = [row("dense", "dense", [5.0, 4.0, 3.0, 2.0]), row("dense_seed2", "dense", [7.0, 6.0, 5.0, 4.0]),
            row("vq", "vq", [4.0, 4.0, 4.0, 4.0]),
            row("late", "late", [1.0, 1.0], offset=2)]           # a second stage: its losses are steps 3-4
    gaps = {r["run"]: r for r in report.loss_gap_rows(rows, ["vq", "late", "missing"], [1, 2, 4], window=2)}
    assert set(gaps) == {"vq", "late"}
    # dense mean curve: 6, 5, 4, 3; windows of 2 up to steps 1, 2, 4: 6, 5.5, 3.5
    assert (gaps["vq"]["n"], gaps["vq"]["gap_1"], gaps["vq"]["gap_2"], gaps["vq"]["gap_4"]) == (1, "-2.000", "-1.500",
                                                                                             "+0.500")
    assert gaps["late"]["gap_1"] is None and gaps["late"]["gap_4"] == "-2.500"


def test_loss_gap_table_in_the_markdown(grid):
    grid.plots["loss_gap"] = {"runs": ["vq"], "steps": [10, 20], "window": 5}
    table = report.markdown(grid, report.collect(grid))
    section = table.split("## training-loss gap vs steps")[1].strip().splitlines()
    assert section[2] == "| run | seeds | vs | step 10 | step 20 |"
    assert section[4] == "| vq | 3 | dense | +0.000 | +0.000 |"     # the fake runs share one loss curve


def test_head_labels_name_the_identity_map_dense_plus_bias():
    def config(output_layer="vq", **vq):
        return {"model": {"output_layer": output_layer, "vocab_size": 8000,
                          "vq": {"codebook_size": 512, "map_init": "frequency", "per_token_bias": True,
                                 "bias_init": "unigram", "refine_rank": 0, **vq}}}

    assert report.head_label(config("dense")) == "dense"
    assert report.head_label(config()) == "VQ K=512 frequency"
    assert report.head_label(config(refine_rank=8)) == "VQ K=512 frequency r=8"
    assert report.head_label(config(codebook_size=8000, map_init="contiguous")) == "dense + bias"
    assert report.head_label(config(codebook_size=8000, map_init="contiguous", bias_init="zeros")) == \
        "dense + bias bias0"
    assert report.head_label(config(codebook_size=8000, map_init="frequency")) == "VQ K=8000 frequency"


def test_loss_gap_against_another_reference():
    rows = [{"run": n, "entry": n, "baseline": "dense", "train_losses": c, "step_offset": 0}
            for n, c in (("dense", [5.0, 5.0]), ("dense_bias", [3.0, 3.0]), ("vq", [4.0, 4.0]))]
    gaps = report.loss_gap_rows(rows, ["vq", "dense_bias"], [2], window=2, versus="dense_bias")
    assert [(g["run"], g["baseline"], g["gap_2"]) for g in gaps] == [("vq", "dense_bias", "+1.000")]


def test_loss_gap_against_a_reference_that_has_not_run_adds_no_table(grid):
    grid.plots["loss_gap"] = {"runs": ["vq"], "steps": [10], "window": 5, "also_vs": ["never_ran"]}
    section = report.markdown(grid, report.collect(grid)).split("## training-loss gap vs steps")[1]
    assert section.count("| run | seeds | vs |") == 1 and "|  |" not in section


def test_a_second_reference_applies_to_its_own_family_only():
    rows = [{"run": n, "entry": n, "baseline": b, "train_losses": [4.0, 4.0], "step_offset": 0}
            for n, b in (("dense", "dense"), ("dense_bias", "dense"), ("vq", "dense"),
                         ("small_dense", "small_dense"), ("deep_vq", "small_dense"))]
    gaps = report.loss_gap_rows(rows, ["vq", "deep_vq"], [2], window=2, versus="dense_bias")
    assert [g["run"] for g in gaps] == ["vq"]
