"""The experiment grid format (experiments/grid.py) and the shipped grids under configs/experiments/."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))   # experiments/ is a folder of scripts at the repository root, not installed

from experiments.grid import load_grid, overrides  # noqa: E402
from experiments.data import vocabulary_size  # noqa: E402
from experiments.run_grid import data_settings, source_settings  # noqa: E402
from vq_megatron.training.config import load_run_config  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "c4_small.yaml"
GRIDS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
DATA = {"vocab": 8000, "train": "D/c4_train", "tokenizer_model": "D/c4.model",
        "eval": {"c4": "D/c4_eval", "wikitext2": "D/wt2_eval"}}
VQ = {"codebook_size": 512, "map_init": "frequency", "codebook_init": "normal", "per_token_bias": True,
      "bias_init": "unigram"}


def write_grid(tmp_path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def driver_settings(grid, spec) -> dict:
    """Every override the runner passes for this run (data, grid, run, source)."""
    source = source_settings(spec, Path("S/step_00000050"), Path("S/head_rows.pt")) if spec.source else {}
    return {**data_settings(grid, {**DATA, "vocab": vocabulary_size(grid.data)}), **spec.settings, **source}


def parsed(settings: dict):
    return load_run_config(BASE_CONFIG, overrides(settings))


def lookup(cfg, path: str):
    section, field, *key = path.split(".")
    value = getattr(getattr(cfg, section), field)
    return value[key[0]] if key else value


# ---------------------------------------------------------------------------------------- shipped grids
def test_shipped_grids_are_found():
    names = {p.stem for p in GRIDS}
    assert {"refine_sp8000", "ablations_sp8000", "ablations_gpt2", "speed_sp8000", "speed_sp32000"} <= names


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_shipped_grid_validates(path):
    grid = load_grid(path)
    names = [s.name for s in grid.runs]
    assert len(names) == len(set(names)) and names
    rows = grid.row_names
    assert grid.baseline is None or grid.baseline in rows
    for spec in grid.runs:
        assert spec.baseline is None or spec.baseline in rows
        if spec.source is not None:
            assert grid.run(spec.source["run"]).steps is not None


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_shipped_overrides_parse_back_through_the_driver(path):
    """Every --set string means, to the training driver's own parser, the value the grid wrote."""
    grid = load_grid(path)
    for spec in grid.runs:
        settings = driver_settings(grid, spec)
        cfg = parsed(settings)
        for key, value in settings.items():
            assert lookup(cfg, key) == value, (spec.name, key)


def test_ablations_runs_mean_what_the_old_grid_meant():
    grid = load_grid(ROOT / "configs" / "experiments" / "ablations_sp8000.yaml")
    seed3 = parsed(driver_settings(grid, grid.run("vq_K512_freq_bias_seed3")))
    assert (seed3.training.seed, seed3.training.steps, seed3.model.vq) == (3, 200, VQ)
    assert (seed3.data.eval_tokens, seed3.training.micro_batch_size, seed3.training.global_batch_size,
            seed3.optim.warmup_steps) == (16384, 8, 16, 20)
    assert seed3.data.eval_sets == DATA["eval"] and seed3.model.vocab_size == 8000
    reinit = parsed(driver_settings(grid, grid.run("vq_K512_recluster_reinit")))
    assert reinit.model.vq == {**VQ, "recluster_interval": 50, "recluster_reinit_codebook": True}
    posthoc = grid.run("vq_K512_posthoc_kmeans_bias0")
    assert posthoc.source == {"run": "dense", "step": 200} and posthoc.use == ("embeddings", "body")
    cfg = parsed(driver_settings(grid, posthoc))
    assert (cfg.training.steps, cfg.optim.warmup_steps) == (50, 50 // 4)
    assert (cfg.model.init_from, cfg.model.vq_init_embeddings) == ("S/step_00000050", "S/head_rows.pt")
    two_stage = grid.run("vq_K512_twostage_kmeans_bias")
    assert two_stage.source["step"] + two_stage.steps == grid.run("dense").steps
    assert grid.run(two_stage.source["run"]).source_only
    assert grid.run("dense_long600").steps == grid.run("vq_K512_freq_bias_long600").steps == 600
    assert [s.seed for s in grid.runs if s.entry == "dense"] == [1234, 2, 3]


def test_speed_grid_times_without_evaluation():
    grid = load_grid(ROOT / "configs" / "experiments" / "speed_sp32000.yaml")
    cfg = parsed(driver_settings(grid, grid.runs[0]))
    assert (cfg.data.eval_sets, cfg.training.steps, cfg.model.vocab_size) == ({}, 30, 32000)
    assert [s.name for s in grid.runs[:5]] == ["speed_sp32000_dense_r0", "speed_sp32000_vq_r0",
                                               "speed_sp32000_vq_nobias_r0", "speed_sp32000_adaptive_r0",
                                               "speed_sp32000_dense_r1"]
    assert grid.baseline in grid.row_names


# ---------------------------------------------------------------------------------------- the format
GRID = """
templates:
  vq: &vq {codebook_size: 512, map_init: frequency, codebook_init: normal, per_token_bias: true, bias_init: unigram}
defaults: {training.steps: 20, parallel: {tensor_parallel: 1}}
baseline: dense
runs:
  - {name: dense, seeds: [1234, 7], set: {model.output_layer: dense}}
  - {name: timed, repeats: 3, set: {model: {output_layer: vq}, model.vq: {<<: *vq, codebook_size: 64}}}
  - {name: refined, baseline: timed, set: {model.output_layer: vq, model.vq: *vq, model.vq.refine_rank: 8}}
  - {name: merged_into_base, set: {model.vq.refine_rank: 4}}
  - {name: other_timed, repeats: 2, set: {model.output_layer: dense}}
"""


def test_seeds_and_repeats_expand_round_robin(tmp_path):
    grid = load_grid(write_grid(tmp_path, GRID))
    assert [s.name for s in grid.runs] == ["dense", "dense_seed7", "timed_r0", "refined", "merged_into_base",
                                           "other_timed_r0", "timed_r1", "other_timed_r1", "timed_r2"]
    assert [(s.seed, s.entry, s.repeat) for s in grid.runs[:3]] == [(1234, "dense", None), (7, "dense", None),
                                                                    (None, "timed", 0)]
    assert grid.run("dense_seed7").settings["training.seed"] == 7
    assert grid.row_names == ["dense", "dense_seed7", "timed", "refined", "merged_into_base", "other_timed"]
    assert grid.run("timed_r2").settings == grid.run("timed_r0").settings


def test_anchors_merge_keys_and_nested_paths(tmp_path):
    grid = load_grid(write_grid(tmp_path, GRID))
    timed = grid.run("timed_r0").settings
    assert timed == {"training.steps": 20, "parallel.tensor_parallel": 1, "model.output_layer": "vq",
                     "model.vq": {**VQ, "codebook_size": 64}}
    assert parsed(timed).model.vq == {**VQ, "codebook_size": 64}
    # model.vq replaces the base config's vq: dict; model.vq.refine_rank then sets one key of it
    assert parsed(grid.run("refined").settings).model.vq == {**VQ, "refine_rank": 8}
    base_vq = load_run_config(BASE_CONFIG).model.vq
    assert parsed(grid.run("merged_into_base").settings).model.vq == {**base_vq, "refine_rank": 4}


@pytest.mark.parametrize("text, message", [
    ("colour: red\nruns: [{name: a}]", "unknown top-level keys"),
    ("runs: [{name: a, steps: 3}]", "unknown keys"),
    ("runs: [{group: x}]", "needs a name"),
    ("runs: [{name: a}, {name: a}]", "duplicate run names"),
    ("runs: [{name: a, seeds: [1, 2]}, {name: a_seed2}]", "duplicate run names"),
    ("runs: [{name: a, use: [body]}]", "needs a `source`"),
    ("runs: [{name: a}, {name: b, source: {run: a, step: 5}, use: [head]}]", "`use` takes"),
    ("runs: [{name: a}, {name: b, source: {run: a}}]", "source must be"),
    ("runs: [{name: a}, {name: b, source: {run: a, step: 5.5}}]", "source must be"),
    ("runs: [{name: b, source: {run: a, step: 5}}]", "unknown run 'a'"),
    ("runs: [{name: b, baseline: a}]", "unknown run 'a'"),
    ("baseline: a\nruns: [{name: b}]", "baseline 'a' is not a run"),
    ("baseline: b_r0\nruns: [{name: b, repeats: 2}]", "baseline 'b_r0' is not a run"),
    ("runs: [{name: a, repeats: 0}]", "repeats must be"),
    ("runs: [{name: a, repeats: 2, seeds: [1, 2]}]", "seeds or repeats"),
    ("runs: [{name: a}]\nplots: {loss_curves: {x: [a, b]}}", "plots refer to unknown runs ['b']"),
    ("runs: [{name: a}]\nplots: {histogram: {}}", "unknown plots keys"),
    ("runs: [{name: a}]\nreport: {bigram: true}", "unknown report keys"),
])
def test_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_grid(write_grid(tmp_path, text))


def test_missing_grid_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "absent.yaml")
