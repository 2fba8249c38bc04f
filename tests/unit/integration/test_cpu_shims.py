"""CPU shims: applied without a GPU, undone exactly (the original objects back), scoped by a context."""

import socket

import megatron.core.fusions.fused_softmax as fused_softmax
import megatron.core.transformer.utils as transformer_utils
import pytest
import torch

from vq_megatron.integration.cpu_shims import apply_cpu_shims, cpu_shims, cpu_shims_active, remove_cpu_shims
from vq_megatron.integration.distributed import init_parallel, shutdown_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without a GPU")


def _patched_objects():
    return (torch.cuda.current_device, torch.cuda.synchronize, transformer_utils.get_default_causal_mask,
            fused_softmax.get_default_causal_mask)


@pytest.fixture
def originals():
    """Start unshimmed and leave the process as it was found."""
    was_active = cpu_shims_active()
    remove_cpu_shims()
    yield _patched_objects()
    remove_cpu_shims()
    if was_active:
        apply_cpu_shims()


def _assert_shimmed():
    assert cpu_shims_active()
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()   # a no-op, not a "no CUDA" error
    mask = transformer_utils.get_default_causal_mask(3)
    assert fused_softmax.get_default_causal_mask is transformer_utils.get_default_causal_mask
    assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True], [False, False, True],
                                                           [False, False, False]]


def _assert_restored(originals):
    assert not cpu_shims_active()
    assert all(now is before for now, before in zip(_patched_objects(), originals, strict=True))


def test_apply_then_remove_restores_the_original_objects(originals):
    assert apply_cpu_shims() is True
    _assert_shimmed()
    remove_cpu_shims()
    _assert_restored(originals)


def test_apply_twice_and_remove_twice_are_harmless(originals):
    assert apply_cpu_shims() is True and apply_cpu_shims() is True
    _assert_shimmed()
    remove_cpu_shims()
    remove_cpu_shims()
    _assert_restored(originals)


def test_context_restores_on_exit_even_after_an_exception(originals):
    with pytest.raises(ZeroDivisionError), cpu_shims():
        _assert_shimmed()
        1 / 0
    _assert_restored(originals)


def test_context_leaves_shims_it_did_not_apply(originals):
    apply_cpu_shims()
    with cpu_shims():
        _assert_shimmed()
    _assert_shimmed()


@pytest.fixture
def one_rank_env(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("callers_own", [False, True])
def test_shutdown_parallel_undoes_only_the_shims_init_parallel_applied(originals, one_rank_env, callers_own):
    if callers_own:
        apply_cpu_shims()
    init_parallel(tensor_parallel=1, backend="gloo")
    _assert_shimmed()
    shutdown_parallel()
    if callers_own:
        _assert_shimmed()
    else:
        _assert_restored(originals)
