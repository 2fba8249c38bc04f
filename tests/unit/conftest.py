import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def parallel():
    """torch.distributed (gloo, one rank) + megatron parallel state for tests that build models."""
    from vq_megatron.integration.distributed import init_parallel, shutdown_parallel

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    init_parallel(tensor_parallel=1, backend="gloo")
    yield
    shutdown_parallel()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
