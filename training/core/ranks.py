"""Which process am I: torchrun's rank and world size, the one-process identity outside it."""

from __future__ import annotations

import os

import torch.distributed as dist


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_env() -> int:
    """torchrun's RANK (0 outside torchrun), also after the process group is gone."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def ranks_on_node() -> int:
    """The ranks torchrun started on this node (LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def layout() -> dict[str, object]:
    """How many processes made this run and where: world size, nodes (torchrun's agent groups,
    GROUP_WORLD_SIZE), ranks on this node and the process group's backend (None in one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = ranks_on_node()
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or -(-world // max(1, per_node))
    return {"world_size": world, "nodes": nodes, "ranks_per_node": per_node,
            "backend": dist.get_backend() if active() else None}


def layout_line(info: dict[str, object]) -> str:
    """The layout in words, e.g. '2 ranks on 2 nodes (1 per node), backend gloo'."""
    nodes = info["nodes"]
    return (f"{info['world_size']} ranks on {nodes} node{'s' if nodes != 1 else ''} "
            f"({info['ranks_per_node']} per node), backend {info['backend']}")
