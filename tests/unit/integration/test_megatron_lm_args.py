"""Megatron-LM hooks: add_vq_args (extra_args_provider), vq_config_from_args, and model_provider."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.integration import megatron_lm
from vq_megatron.integration.megatron_lm import (
    UNEXPOSED_FIELDS, VQ_CONFIG_FLAGS, add_vq_args, load_vq_init_tensors, model_provider, vq_config_from_args,
    vq_vocab_size_from_args,
)

FULL_VQ_CLI = [
    "--output-layer-type", "vq", "--vq-codebook-size", "64", "--vq-vocab-size", "500",
    "--vq-map-init", "kmeans", "--vq-codebook-init", "kmeans", "--vq-codebook-init-std", "0.05",
    "--vq-per-token-bias", "--vq-seed", "7", "--vq-kmeans-iters", "3", "--vq-spherical-kmeans",
    "--vq-label-smoothing", "0.1", "--vq-z-loss", "1e-4", "--vq-init-embeddings", "/tmp/emb.pt",
]
VQ_FLAGS = ["--output-layer-type", "--vq-codebook-size", "--vq-vocab-size", "--vq-map-init",
            "--vq-codebook-init", "--vq-codebook-init-std", "--vq-per-token-bias", "--vq-bias-init", "--vq-seed",
            "--vq-kmeans-iters", "--vq-spherical-kmeans", "--vq-label-smoothing", "--vq-z-loss",
            "--vq-refine-rank", "--vq-refine-init", "--vq-refine-init-std", "--vq-tensor-parallel-loss",
            "--vq-token-counts", "--vq-init-embeddings"]
# A field name as a word: what an error shown to a command-line user must not contain.
FIELD_WORD = re.compile(r"\b(%s)\b" % "|".join(f.name for f in dataclasses.fields(VQLogitsConfig)))


def assert_names_flags(error: ValueError, flags) -> None:
    message = str(error)
    for flag in flags:
        assert flag in message
    assert "VQLogitsConfig." not in message and not FIELD_WORD.search(message), message


def vq_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=1234)  # Megatron-LM's own; --vq-seed falls back to it
    returned = add_vq_args(parser)
    assert returned is parser
    return parser


# ------------------------------------------------------------------------------------------- parsing
def test_defaults_keep_the_dense_head():
    args = vq_parser().parse_args([])
    assert args.output_layer_type == "dense"
    assert args.vq_codebook_size == 1024
    assert args.vq_map_init == "random" and args.vq_codebook_init == "normal"
    assert args.vq_codebook_init_std == pytest.approx(0.02)
    assert args.vq_per_token_bias is False and args.vq_spherical_kmeans is False
    assert args.vq_seed is None and args.vq_kmeans_iters == 50
    assert args.vq_label_smoothing == 0.0 and args.vq_z_loss == 0.0
    assert args.vq_token_counts is None and args.vq_init_embeddings is None and args.vq_vocab_size is None
    # every default agrees with VQLogitsConfig's
    cfg = vq_config_from_args(args, vocab_size=5000, hidden_size=32)
    assert cfg == VQLogitsConfig(vocab_size=5000, hidden_size=32)


def test_full_vq_command_line():
    args = vq_parser().parse_args(FULL_VQ_CLI)
    assert args.output_layer_type == "vq"
    assert args.vq_codebook_size == 64 and args.vq_vocab_size == 500
    assert args.vq_map_init == "kmeans" and args.vq_codebook_init == "kmeans"
    assert args.vq_codebook_init_std == pytest.approx(0.05)
    assert args.vq_per_token_bias is True and args.vq_spherical_kmeans is True
    assert args.vq_seed == 7 and args.vq_kmeans_iters == 3
    assert args.vq_label_smoothing == pytest.approx(0.1) and args.vq_z_loss == pytest.approx(1e-4)
    assert args.vq_init_embeddings == "/tmp/emb.pt" and args.vq_token_counts is None
    args = vq_parser().parse_args(["--vq-map-init", "frequency", "--vq-token-counts", "counts.npy"])
    assert args.vq_map_init == "frequency" and args.vq_token_counts == "counts.npy"


def test_every_flag_is_in_help_with_text():
    parser = vq_parser()
    text = parser.format_help()
    assert "VQ-Logits output layer:" in text
    group = next(g for g in parser._action_groups if g.title == "VQ-Logits output layer")
    options = {opt: action for action in group._group_actions for opt in action.option_strings}
    assert sorted(options) == sorted(VQ_FLAGS)
    for flag, action in options.items():
        assert flag in text
        assert action.help and len(action.help) > 20, flag
        assert action.dest == "output_layer_type" or action.dest.startswith("vq_"), action.dest
    assert "--untie-embeddings-and-output-weights" in options["--output-layer-type"].help


def test_every_config_field_has_a_flag_or_a_reason():
    fields = {f.name for f in dataclasses.fields(VQLogitsConfig)}
    assert not set(VQ_CONFIG_FLAGS) & set(UNEXPOSED_FIELDS)
    assert set(VQ_CONFIG_FLAGS) | set(UNEXPOSED_FIELDS) == fields, "a new VQLogitsConfig field needs a row"
    assert all(len(reason) > 10 for reason in UNEXPOSED_FIELDS.values())


def test_table_flags_take_the_config_defaults():
    actions = {action.dest: action for action in vq_parser()._actions}
    for field in dataclasses.fields(VQLogitsConfig):
        row = VQ_CONFIG_FLAGS.get(field.name)
        if row is not None:
            action = actions[row.dest]
            assert action.option_strings == [row.flag]
            assert action.default == (None if row.fallback else field.default), row.flag


def test_refine_flags_parse_into_the_config():
    args = vq_parser().parse_args(["--vq-refine-rank", "8", "--vq-refine-init", "zeros",
                                   "--vq-refine-init-std", "0.05"])
    assert args.vq_refine_rank == 8 and args.vq_refine_init == "zeros"
    assert args.vq_refine_init_std == pytest.approx(0.05)
    cfg = vq_config_from_args(args, vocab_size=5000, hidden_size=32)
    assert cfg == VQLogitsConfig(vocab_size=5000, hidden_size=32, refine_rank=8, refine_init="zeros",
                                 refine_init_std=0.05)
    assert cfg.refined


@pytest.mark.parametrize("argv", [
    ["--output-layer-type", "sparse"], ["--vq-map-init", "kmeanz"], ["--vq-codebook-init", "uniform"],
    ["--vq-codebook-size", "lots"], ["--vq-z-loss", "x"], ["--vq-per-token-bias", "yes"],
    ["--vq-refine-init", "pca"], ["--vq-refine-rank", "2.5"],
])
def test_bad_values_exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        vq_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_collision_with_megatron_lm_parser():
    # Megatron-LM's training package is installed with megatron-core here: add our group to its parser.
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    megatron_dests = {a.dest for a in parser._actions}
    megatron_options = {o for a in parser._actions for o in a.option_strings}
    assert "--seed" in megatron_options and "--vocab-size" in megatron_options  # it is the real parser
    add_vq_args(parser)  # argparse raises ArgumentError on a clashing option string
    ours = [a for a in parser._actions if set(a.option_strings) & set(VQ_FLAGS)]
    assert len(ours) == len(VQ_FLAGS)
    assert not {a.dest for a in ours} & megatron_dests
    args = parser.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                              "--untie-embeddings-and-output-weights", *FULL_VQ_CLI])
    assert args.output_layer_type == "vq" and args.seed == 1234 and args.vq_seed == 7

    # Such a full namespace gets its TransformerConfig from Megatron-LM's core_transformer_config_from_args
    # (validate_args would set params_dtype; the local spec needs no TE rope fusion).
    args.params_dtype, args.apply_rope_fusion = torch.float32, False
    config = megatron_lm.transformer_config_from_args(args)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 256)
    assert config.hidden_dropout == pytest.approx(0.1)  # Megatron-LM's default, not megatron-core's


# ------------------------------------------------------------------------------------ vq config
def test_vq_config_from_args_values():
    args = vq_parser().parse_args(FULL_VQ_CLI)
    cfg = vq_config_from_args(args, vocab_size=500, hidden_size=48)
    assert cfg == VQLogitsConfig(vocab_size=500, hidden_size=48, codebook_size=64, map_init="kmeans",
                                 codebook_init="kmeans", codebook_init_std=0.05, per_token_bias=True,
                                 seed=7, kmeans_iters=3, spherical_kmeans=True, label_smoothing=0.1,
                                 z_loss=1e-4)
    # --vq-seed defaults to Megatron-LM's --seed
    args = vq_parser().parse_args(["--output-layer-type", "vq", "--seed", "99"])
    assert vq_config_from_args(args, vocab_size=5000, hidden_size=48).seed == 99


CONFIG_ERROR_CASES = [
    (["--vq-codebook-size", "600"], 500, ["--vq-codebook-size 600", "the vocabulary size 500"]),
    (["--vq-codebook-size", "0"], 5000, ["--vq-codebook-size"]),
    (["--vq-label-smoothing", "1.0"], 5000, ["--vq-label-smoothing"]),
    (["--vq-z-loss", "-1"], 5000, ["--vq-z-loss"]),
    (["--vq-codebook-init-std", "0"], 5000, ["--vq-codebook-init-std"]),
    (["--vq-codebook-init", "kmeans"], 5000, ["--vq-codebook-init", "--vq-map-init kmeans"]),
    (["--vq-map-init", "frequency"], 5000, ["--vq-token-counts"]),
    (["--vq-map-init", "kmeans"], 5000, ["--vq-init-embeddings"]),
    (["--vq-token-counts", "c.npy"], 5000, ["--vq-token-counts", "frequency"]),
    (["--vq-init-embeddings", "e.npy"], 5000, ["--vq-init-embeddings", "kmeans"]),
    (["--vq-bias-init", "unigram"], 5000, ["--vq-token-counts"]),
    (["--vq-bias-init", "unigram", "--vq-token-counts", "c.npy"], 5000,
     ["--vq-bias-init unigram", "--vq-per-token-bias"]),
    (["--vq-kmeans-iters", "0"], 5000, ["--vq-kmeans-iters"]),
    (["--vq-refine-rank", "-1"], 5000, ["--vq-refine-rank"]),
    (["--vq-refine-rank", "64"], 5000, ["--vq-refine-rank 64", "--hidden-size 32"]),
    (["--vq-refine-rank", "8", "--vq-label-smoothing", "0.1"], 5000,
     ["--vq-label-smoothing 0.1", "--vq-refine-rank 8", "use --vq-label-smoothing 0 or --vq-refine-rank 0"]),
    (["--vq-refine-init", "svd"], 5000,
     ["--vq-refine-init svd", "--vq-map-init kmeans", "--vq-codebook-init kmeans"]),
    (["--vq-refine-init-std", "0"], 5000, ["--vq-refine-init-std"]),
]
# Table fields for which every value argparse accepts is valid: they have no config error to provoke (a bad
# choice is covered by test_bad_choice_in_a_hand_made_namespace_names_the_flag).
ANY_VALUE_IS_VALID = {"seed", "spherical_kmeans", "tensor_parallel_loss"}


@pytest.mark.parametrize("argv, vocab, flags", CONFIG_ERROR_CASES)
def test_vq_config_errors_name_the_flags(argv, vocab, flags):
    args = vq_parser().parse_args(["--output-layer-type", "vq", *argv])
    with pytest.raises(ValueError) as exc:
        vq_config_from_args(args, vocab_size=vocab, hidden_size=32)
    assert_names_flags(exc.value, flags)


def test_error_cases_cover_every_flag_of_the_table():
    named = {word for _, _, flags in CONFIG_ERROR_CASES for text in flags for word in text.split()}
    unprovoked = [row.flag for field, row in VQ_CONFIG_FLAGS.items()
                  if row.flag not in named and field not in ANY_VALUE_IS_VALID]
    assert not unprovoked, f"add a CONFIG_ERROR_CASES entry whose error names {unprovoked}"


@pytest.mark.parametrize("field", [field for field, row in VQ_CONFIG_FLAGS.items() if row.choices])
def test_bad_choice_in_a_hand_made_namespace_names_the_flag(field):
    row = VQ_CONFIG_FLAGS[field]  # argparse rejects it first on a command line; a namespace skips that
    with pytest.raises(ValueError) as exc:
        vq_config_from_args(SimpleNamespace(**{row.dest: "bogus"}), vocab_size=5000, hidden_size=32)
    assert_names_flags(exc.value, [f"{row.flag} bogus is not one of"])


def test_vocab_size_resolution(monkeypatch):
    ns = SimpleNamespace
    assert vq_vocab_size_from_args(ns(vq_vocab_size=300, vocab_size=250, padded_vocab_size=384)) == 300
    assert vq_vocab_size_from_args(ns(vq_vocab_size=None, vocab_size=250, padded_vocab_size=384)) == 250
    assert vq_vocab_size_from_args(ns(vocab_size=250, padded_vocab_size=384)) == 250
    with pytest.warns(UserWarning, match="--vq-vocab-size"):
        assert vq_vocab_size_from_args(ns(vocab_size=None, padded_vocab_size=384)) == 384
    with pytest.raises(ValueError, match="exceeds padded_vocab_size"):
        vq_vocab_size_from_args(ns(vq_vocab_size=400, padded_vocab_size=384))
    with pytest.raises(ValueError, match="--vq-vocab-size"):
        vq_vocab_size_from_args(ns())
    # A built Megatron-LM tokenizer beats --vocab-size (which may or may not count EOD).
    fake_global_vars = SimpleNamespace(_GLOBAL_TOKENIZER=SimpleNamespace(vocab_size=251))
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", fake_global_vars)
    assert vq_vocab_size_from_args(ns(vocab_size=250, padded_vocab_size=384)) == 251
    assert vq_vocab_size_from_args(ns(vq_vocab_size=300, vocab_size=250, padded_vocab_size=384)) == 300


def test_load_init_tensors_drops_padding_rows(tmp_path):
    counts = np.arange(10, dtype=np.int64)
    np.save(tmp_path / "counts.npy", counts)
    emb = torch.randn(12, 4)
    torch.save({"weight": emb}, tmp_path / "emb.pt")
    args = SimpleNamespace(vq_token_counts=str(tmp_path / "counts.npy"),
                           vq_init_embeddings=str(tmp_path / "emb.pt"))
    got_counts, got_emb = load_vq_init_tensors(args, vocab_size=8)
    assert torch.equal(got_counts, torch.arange(8))
    assert torch.equal(got_emb, emb[:8])
    with pytest.raises(ValueError, match="--vq-token-counts"):
        load_vq_init_tensors(args, vocab_size=11)
    (tmp_path / "counts.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_vq_init_tensors(SimpleNamespace(vq_token_counts=str(tmp_path / "counts.txt")), vocab_size=3)


# ------------------------------------------------------------------------------------ model_provider
def model_args(*argv, **overrides) -> SimpleNamespace:
    """A hand-made namespace as Megatron-LM would hand it over (after validate_args) plus the vq flags."""
    args = SimpleNamespace(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=8,
        max_position_embeddings=8, vocab_size=200, padded_vocab_size=256, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, sequence_parallel=False, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02, transformer_impl="local",
        untie_embeddings_and_output_weights=True, position_embedding_type="learned_absolute",
        **vars(vq_parser().parse_args(list(argv))))
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_dense_model_provider_builds_gpt_model(parallel):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from vq_megatron.models import VQGPTModel

    model = model_provider(pre_process=True, post_process=True, args=model_args())
    assert type(model) is GPTModel and not isinstance(model, VQGPTModel)
    assert isinstance(model.output_layer, ColumnParallelLinear)
    assert tuple(model.output_layer.weight.shape) == (256, 32)  # padded vocab
    assert model.share_embeddings_and_output_weights is False
    assert model.config.num_layers == 2 and model.config.hidden_size == 32
    tied = model_provider(args=model_args(untie_embeddings_and_output_weights=False))
    assert tied.share_embeddings_and_output_weights is True
    assert tied.shared_embedding_or_output_weight() is tied.embedding.word_embeddings.weight
    # Megatron-LM's default transformer_impl is transformer_engine: without TE the local spec is used
    with pytest.warns(UserWarning, match="Transformer Engine"):
        fallback = model_provider(args=model_args(transformer_impl="transformer_engine"))
    assert isinstance(fallback.output_layer, ColumnParallelLinear)


def test_vq_model_provider_builds_vq_gpt_model(parallel, tmp_path):
    from vq_megatron.models import VQGPTModel
    from vq_megatron.layers import VQOutputLayer

    counts = np.random.default_rng(0).integers(1, 1000, size=256)  # padded length: the tail is dropped
    np.save(tmp_path / "counts.npy", counts)
    args = model_args("--output-layer-type", "vq", "--vq-codebook-size", "16", "--vq-map-init", "frequency",
                      "--vq-token-counts", str(tmp_path / "counts.npy"), "--vq-per-token-bias")
    model = model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, args=args)
    assert isinstance(model, VQGPTModel)
    layer = model.output_layer
    assert isinstance(layer, VQOutputLayer)
    assert layer.num_codes == 16 and tuple(layer.codebook.shape) == (16, 32)
    assert layer.vocab_size == 200 and layer.padded_vocab_size == 256  # map over args.vocab_size only
    assert layer.config.map_init == "frequency" and layer.bias is not None
    assert int(layer.code_counts.sum()) == 200

    b, s = 2, 8
    torch.manual_seed(0)
    tokens = torch.randint(0, 200, (b, s))
    labels = torch.randint(0, 200, (b, s))
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    loss = model(tokens, position_ids, mask, labels=labels)
    assert loss.shape == (b, s)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
    with torch.no_grad():
        logits = model(tokens, position_ids, mask)
    assert logits.shape == (b, s, 256)


def test_vq_model_provider_last_stage_only(parallel):
    from vq_megatron.models import VQGPTModel

    # A first pipeline stage never loads the init files (a missing path would fail otherwise).
    args = model_args("--output-layer-type", "vq", "--vq-codebook-size", "16", "--vq-map-init", "frequency",
                      "--vq-token-counts", "/nonexistent/counts.npy")
    model = model_provider(pre_process=True, post_process=False, args=args)
    assert isinstance(model, VQGPTModel) and not hasattr(model, "output_layer")


def test_vq_with_tied_embeddings_is_refused():
    args = model_args("--output-layer-type", "vq", untie_embeddings_and_output_weights=False)
    with pytest.raises(ValueError, match="--untie-embeddings-and-output-weights"):
        model_provider(args=args)


def test_vq_model_provider_builds_the_refined_head(parallel):
    layer = model_provider(args=model_args("--output-layer-type", "vq", "--vq-codebook-size", "16",
                                           "--vq-refine-rank", "4")).output_layer
    assert layer.config.refine_rank == 4
    assert tuple(layer.refine_weight.shape) == (256, 4) and tuple(layer.refine_proj.shape) == (4, 32)


@pytest.mark.parametrize("argv, flags", [
    (["--vq-vocab-size", "0"], ["the vocabulary size (--vq-vocab-size) must be a positive integer"]),
    (["--vq-refine-rank", "64"], ["--vq-refine-rank 64 exceeds --hidden-size 32"]),
])
def test_model_provider_config_errors_name_the_flags(argv, flags):
    with pytest.raises(ValueError) as exc:
        model_provider(args=model_args("--output-layer-type", "vq", "--vq-codebook-size", "16", *argv))
    assert_names_flags(exc.value, flags)


def test_model_provider_layer_errors_name_the_flags(parallel, tmp_path):
    # The layer finds this one (the embeddings' width is known once they are read): "codebook_init='kmeans'
    # needs embeddings of width hidden_size=32".
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).standard_normal((200, 48)).astype(np.float32))
    args = model_args("--output-layer-type", "vq", "--vq-codebook-size", "16", "--vq-map-init", "kmeans",
                      "--vq-codebook-init", "kmeans", "--vq-kmeans-iters", "2",
                      "--vq-init-embeddings", str(tmp_path / "emb.npy"))
    with pytest.raises(ValueError) as exc:
        model_provider(args=args)
    assert_names_flags(exc.value, ["--vq-codebook-init kmeans", "--hidden-size 32"])


def test_mtp_num_layers_builds_the_mtp_block_with_a_vq_head(parallel):
    """--mtp-num-layers as Megatron-LM's gpt_builder builds it; the VQ loss runs every depth collapsed."""
    model = model_provider(args=model_args("--output-layer-type", "vq", "--vq-codebook-size", "16",
                                           mtp_num_layers=1, mtp_loss_scaling_factor=0.1))
    assert model.mtp_process and len(model.mtp.layers) == 1
    tokens = torch.randint(0, 200, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    loss = model(tokens, positions, mask, labels=torch.randint(0, 200, (2, 8)))
    loss.mean().backward()
    assert loss.shape == (2, 8) and float(model.mtp.layers[0].eh_proj.weight.grad.abs().sum()) > 0


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="--use-legacy-models"):
        model_provider(args=model_args("--output-layer-type", "vq", use_legacy_models=True))
    with pytest.raises(ValueError, match="--output-layer-type"):
        model_provider(args=model_args(output_layer_type="sparse"))


def test_without_args_and_without_megatron_lm(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training", None)  # `import megatron.training` fails
    with pytest.raises(ImportError, match="pass args= or install Megatron-LM"):
        model_provider()


def test_without_args_before_megatron_lm_initialised():
    import megatron.training.global_vars as global_vars

    assert global_vars._GLOBAL_ARGS is None
    with pytest.raises(RuntimeError, match="pass args="):
        model_provider()
