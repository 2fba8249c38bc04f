"""Run-config loading: YAML + overrides, and the errors a user sees for bad config."""

import pytest

from vq_megatron.training.config import load_run_config
from vq_megatron.train import main as train_main


def test_repo_config_loads_and_overrides_apply():
    cfg = load_run_config("configs/c4_small.yaml", ["model.output_layer=dense", "optim.lr=3e-3", "data.tokenizer_model=",
                                                    "training.steps=7", "data.eval_sets.wiki=/x/y"])
    assert cfg.model.output_layer == "dense" and cfg.optim.lr == 0.003 and cfg.training.steps == 7
    assert cfg.data.eval_sets["wiki"] == "/x/y" and "c4_val" in cfg.data.eval_sets
    assert cfg.data.tokenizer_model == ""
    assert cfg.gradient_accumulation(data_parallel=1) == 2


@pytest.mark.parametrize("override,match", [
    ("model.output_layer=sparse", "output_layer='sparse' is not one of"),
    ("model.tie_embeddings=true", "tie_embeddings=true needs output_layer: dense"),
    ("model.vq.codebook_size=9000", "exceeds vocab_size"),
    ("model.vq.codebok_size=12", r"unknown vq option\(s\) \['codebok_size'\]"),
    ("model.vq.map_init=kmeans", "needs model.vq_init_embeddings"),
    ("model.hidden_size=130", "not divisible by num_attention_heads"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("optim.min_lr=1.0", "min_lr <= lr"),
    ("training.steps=ten", "training.steps must be an integer"),
    ("training.precision=fp16", "precision must be fp32 or bf16"),
    ("training.stepz=3", r"unknown option\(s\) \['stepz'\] in section 'training'"),
    ("trainer.steps=3", r"unknown config section\(s\) \['trainer'\]"),
    ("steps=3", "must look like section.field=value"),
])
def test_bad_config_gives_a_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        load_run_config("configs/c4_small.yaml", [override])


@pytest.mark.parametrize("overrides,match", [
    (["model.num_layers=3"], "pipeline_parallel=2 must divide model.num_layers=3"),
    (["model.output_layer=dense", "model.tie_embeddings=true"], "tie_embeddings=true is not supported with "
                                                                 "parallel.pipeline_parallel=2"),
    (["training.nan_policy=skip"], "nan_policy=skip is not supported with parallel.pipeline_parallel=2: .* use "
                                   "nan_policy=stop"),
    (["model.vq.recluster_interval=10"], "recluster_interval > 0 is not supported with"),
    (["model.init_from=runs/dense"], "model.init_from is not supported with parallel.pipeline_parallel=2"),
    (["model.mtp_num_layers=1"], "mtp_num_layers > 0 is not supported with parallel.pipeline_parallel=2"),
])
def test_what_the_pipeline_driver_cannot_do_is_refused_up_front(overrides, match):
    load_run_config("configs/c4_small.yaml", ["parallel.pipeline_parallel=2"])   # the plain case is fine
    with pytest.raises(ValueError, match=match):
        load_run_config("configs/c4_small.yaml", ["parallel.pipeline_parallel=2", *overrides])


def test_batch_and_parallel_sizes_are_checked():
    cfg = load_run_config("configs/c4_small.yaml", ["training.global_batch_size=12"])
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x data_parallel = 16"):
        cfg.gradient_accumulation(data_parallel=2)
    cfg = load_run_config("configs/c4_small.yaml", ["model.num_attention_heads=2", "model.hidden_size=128"])
    with pytest.raises(ValueError, match="tensor_parallel=4 must divide model.num_attention_heads=2"):
        cfg.model.transformer_config(tensor_parallel=4)


def test_cli_reports_config_errors_before_starting_processes(capsys):
    with pytest.raises(FileNotFoundError, match="config file nope.yaml does not exist"):
        train_main(["--config", "nope.yaml"])
    with pytest.raises(ValueError, match="output_layer='x'"):
        train_main(["--config", "configs/c4_small.yaml", "--set", "model.output_layer=x"])
