"""Metrics used by every stage: error %, NLL, expected calibration error (15 bins), Brier score."""

from __future__ import annotations

import torch


def error_percent(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) != labels).float().mean() * 100.0)


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (nats) from probabilities."""
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    return float(-torch.log(picked.clamp_min(eps)).mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins: sum_b |B|/n * |acc(B) - conf(B)|."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a softmax
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    counts = torch.zeros(bins, dtype=probs.dtype, device=probs.device).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(counts).index_add_(0, index, confidence)
    acc_sum = torch.zeros_like(counts).index_add_(0, index, correct.to(probs.dtype))
    return float((acc_sum - conf_sum).abs().sum() / len(labels))


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of sum_c (p_c - 1[y = c])^2 (0 is perfect, 2 the worst)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Error (%), NLL (nats), ECE (fraction) and Brier score of predicted probabilities."""
    probs, labels = probs.double(), labels.to(probs.device)
    return {
        "error": error_percent(probs, labels),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
    }


def disagreement(member_probs: torch.Tensor) -> float:
    """Mean pairwise fraction of inputs on which two members' top classes differ."""
    k = member_probs.shape[0]
    if k < 2:
        return 0.0
    top = member_probs.argmax(dim=2)  # [K, N]
    differs = (top[:, None, :] != top[None, :, :]).float().mean(dim=2)  # [K, K]
    return float(differs.sum() / (k * (k - 1)))
