"""Independent network evaluations side by side: one per thread torch may use.

On the CPU the small kernels of one evaluation wait on each other when torch splits them over
two cores; two evaluations at once, each on one thread, keep both cores busy (the plane at
G = 21 on the demo: benchmarks/results/swa_plane-*.md). torch's kernels release the GIL, so
Python threads suffice. On a GPU, or for a network with dropout, one at a time: concurrent
passes would draw dropout masks from the shared global RNG in no fixed order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

Item = TypeVar("Item")
Result = TypeVar("Result")


def workers_for(net: nn.Module, device: torch.device, streamed: bool = False) -> int:
    """How many evaluations of `net` run side by side on `device`. Over `streamed` data one at a
    time: its loader workers already take the cores, and workers started from several threads at
    once (each pass that overlaps another starts its own loader) were seen to exit with status 1
    when their loader shut down, which torch reports as a failed worker."""
    if streamed or device.type != "cpu" or any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules()):
        return 1
    return max(1, torch.get_num_threads())


def map_side_by_side(work: Callable[[Item], Result], items: Sequence[Item], workers: int) -> list[Result]:
    """[work(item) for item in items], `workers` at a time, each on one torch thread; in order."""
    if workers <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    results: list[Result | None] = [None] * len(items)

    def share(k: int) -> None:
        for n in range(k, len(items), workers):
            results[n] = work(items[n])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(share, k) for k in range(workers)]:
                done.result()
    finally:
        torch.set_num_threads(threads)
    return results  # type: ignore[return-value]
