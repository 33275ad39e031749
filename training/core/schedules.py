"""Learning-rate schedules in one place (the paper's formulas, see docs/design.md)."""

from __future__ import annotations

import math


def paper_learning_rate(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Constant for the first half, linear to 1 % of base by 90 %, then constant.

    `epoch` counts from 0, as in the paper's code (the factor is decided at the epoch's start).
    """
    progress = epoch / total_epochs
    if progress <= 0.5:
        factor = 1.0
    elif progress <= 0.9:
        factor = 1.0 - (progress - 0.5) / 0.4 * 0.99
    else:
        factor = 0.01
    return base_lr * factor


def fge_learning_rate(iteration: int, cycle: int, lr1: float, lr2: float) -> float:
    """FGE's triangular cycle (Garipov et al. 2018, eq. 2); `iteration` counts from 1.

    t(i) = (mod(i-1, c) + 1)/c; lr = (1-2t) lr1 + 2t lr2 for t <= 1/2, else (2-2t) lr2 + (2t-1) lr1.
    """
    if cycle < 2 or cycle % 2:
        raise ValueError(f"the FGE cycle must be an even number of iterations >= 2, got {cycle}")
    t = ((iteration - 1) % cycle + 1) / cycle
    if t <= 0.5:
        return (1.0 - 2.0 * t) * lr1 + 2.0 * t * lr2
    return (2.0 - 2.0 * t) * lr2 + (2.0 * t - 1.0) * lr1


def fge_collects(iteration: int, cycle: int) -> bool:
    """FGE adds the current weights to the ensemble at the middle of each cycle (lr = lr2)."""
    return iteration % cycle == cycle // 2


def cosine_restart_learning_rate(iteration: int, iterations_per_cycle: int, base_lr: float) -> float:
    """Snapshot Ensembles (Huang et al. 2017): lr = base/2 (cos(pi mod(i-1, T) / T) + 1)."""
    position = (iteration - 1) % iterations_per_cycle
    return base_lr / 2.0 * (math.cos(math.pi * position / iterations_per_cycle) + 1.0)


def even_cycle_iterations(cycle_epochs: float, iterations_per_epoch: int) -> int:
    """Convert a cycle given in epochs to an even number of iterations (at least 2)."""
    iterations = max(2, round(cycle_epochs * iterations_per_epoch))
    return iterations + (iterations % 2)
