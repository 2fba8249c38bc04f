"""Count the torch.distributed collectives (calls and tensor bytes) a block of code issues on this rank.

Wrapping only `torch.distributed.<name>` is not enough: megatron-core binds
`dist_all_gather_func = torch.distributed.all_gather_into_tensor` at import time, so the wrapper is
installed on every module attribute that *is* one of the original functions, and removed on exit.
A call made from inside another counted call (e.g. a deprecated alias forwarding to the new name) is
counted once, by the outermost wrapper.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Each collective's bytes on the wire per rank for a ring implementation, as a multiple of its payload
# (the full logical tensor: the reduced tensor, the gathered output, the scattered input).
RING_SEND_FACTOR = {
    "all_reduce": lambda t: 2 * (t - 1) / t,
    "broadcast": lambda t: 1.0 if t > 1 else 0.0,
}
_GATHER_LIKE = lambda t: (t - 1) / t  # noqa: E731
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "_all_gather_base", "_reduce_scatter_base", "all_to_all_single")


@dataclass
class CollectiveCall:
    name: str
    payload_bytes: int      # largest tensor argument (a list of tensors counts as their sum)
    group_size: int

    @property
    def ring_send_bytes(self) -> float:
        return self.payload_bytes * RING_SEND_FACTOR.get(self.name, _GATHER_LIKE)(self.group_size)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


class CollectiveCounter:
    """Context manager: `calls` lists every collective issued on this rank while it is active."""

    def __init__(self):
        self.calls: list[CollectiveCall] = []
        self._restore: list[tuple[object, str, object]] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- patching
    def __enter__(self) -> "CollectiveCounter":
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        wrappers = {id(fn): (fn, self._wrap(name, fn)) for name, fn in originals.items()}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                entry = wrappers.get(id(value))
                if entry is not None and entry[0] is value:
                    setattr(module, attr, entry[1])
                    self._restore.append((module, attr, value))
        return self

    def __exit__(self, *exc) -> None:
        for module, attr, original in reversed(self._restore):
            setattr(module, attr, original)
        self._restore.clear()

    def _wrap(self, name: str, original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self._record(name, signature, args, kwargs)
            self._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth

        return counted

    def _record(self, name: str, signature: inspect.Signature, args, kwargs) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        payload = max((_tensor_bytes(value) for value in bound.values()), default=0)
        group_size = dist.get_world_size(bound.get("group"))
        with self._lock:
            self.calls.append(CollectiveCall(name, payload, group_size))

    # -- summaries
    @property
    def payload_bytes(self) -> int:
        return sum(call.payload_bytes for call in self.calls)

    @property
    def ring_send_bytes(self) -> float:
        return sum(call.ring_send_bytes for call in self.calls)

    def by_name(self) -> dict[str, dict[str, int]]:
        summary: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "payload_bytes": 0})
        for call in self.calls:
            summary[call.name]["calls"] += 1
            summary[call.name]["payload_bytes"] += call.payload_bytes
        return dict(summary)
