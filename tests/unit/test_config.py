import pytest

from vq_megatron.config import VQLogitsConfig


def test_defaults_are_valid():
    cfg = VQLogitsConfig(vocab_size=50304, hidden_size=768)
    assert cfg.codebook_size == 1024 and cfg.map_init == "random"
    assert cfg.output_layer_parameters() == 1024 * 768


@pytest.mark.parametrize("kwargs,match", [
    (dict(codebook_size=0), "codebook_size must be a positive integer"),
    (dict(codebook_size=101), "exceeds vocab_size"),
    (dict(map_init="learned"), "map_init='learned' is not one of"),
    (dict(codebook_init="xavier"), "codebook_init='xavier' is not one of"),
    (dict(codebook_init="kmeans"), "needs map_init='kmeans'"),
    (dict(codebook_init_std=0.0), "codebook_init_std must be > 0"),
    (dict(label_smoothing=1.0), "label_smoothing must be in"),
    (dict(z_loss=-1.0), "z_loss must be >= 0"),
    (dict(hidden_size=True), "hidden_size must be a positive integer"),
    (dict(kmeans_iters=0), "kmeans_iters must be a positive integer"),
])
def test_invalid_options_raise_clear_errors(kwargs, match):
    base = dict(vocab_size=100, hidden_size=8, codebook_size=10)
    with pytest.raises(ValueError, match=match):
        VQLogitsConfig(**{**base, **kwargs})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown vq option\(s\) \['codebok_size'\]"):
        VQLogitsConfig.from_dict({"codebok_size": 12}, vocab_size=100, hidden_size=8)
    cfg = VQLogitsConfig.from_dict({"codebook_size": 12, "per_token_bias": True}, vocab_size=100, hidden_size=8)
    assert cfg.codebook_size == 12 and cfg.per_token_bias
    assert cfg.output_layer_parameters() == 12 * 8 + 100
