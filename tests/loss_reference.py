"""Float64 single-process references for the loss tests, written with plain autograd."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def reference(kind: str, student: Tensor, teacher: Tensor, *, temperature: float = 1.0,
              beta: float = 0.5, mu: float = 0.5) -> Tensor:
    """Per-token divergence on the full vocabulary, float64, differentiable in `student`.

    kind: forward | reverse | jsd | akl. Rows that are −inf everywhere in both logits are defined
    to have divergence 0 (and zero gradient): they are replaced by equal zero logits.
    """
    s = student.double() / temperature
    t = teacher.double() / temperature
    dead = torch.isneginf(s).all(-1, keepdim=True) & torch.isneginf(t).all(-1, keepdim=True)
    s = torch.where(dead, 0.0, s)
    t = torch.where(dead, 0.0, t)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward" if beta == 0.0 else "reverse"
    if kind == "forward":
        return _kl_terms(pt, lt, ls).sum(-1)
    if kind == "reverse":
        return _kl_terms(ps, ls, lt).sum(-1)
    if kind == "jsd":
        both_zero = (ps == 0) & (pt == 0)  # logaddexp(-inf, -inf) has a NaN gradient; unused there
        lm = torch.logaddexp(torch.where(both_zero, 0.0, ls) + math.log(1 - beta),
                             torch.where(both_zero, 0.0, lt) + math.log(beta))
        return beta * _kl_terms(pt, lt, lm).sum(-1) + (1 - beta) * _kl_terms(ps, ls, lm).sum(-1)
    if kind == "akl":
        sorted_pt, order = pt.sort(-1, descending=True)
        head_sorted = (sorted_pt.cumsum(-1) - sorted_pt) < mu   # mass strictly before < mu
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (pt - ps.detach()).abs()
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        return w_head * _kl_terms(pt, lt, ls).sum(-1) + (1 - w_head) * _kl_terms(ps, ls, lt).sum(-1)
    raise ValueError(kind)


def make_logits(seed: int, shape: tuple[int, ...], *, pad: int = 0, dead_row: bool = False,
                scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits, teacher logits (correlated with the student) and a per-token grad weight.

    `pad` last vocabulary entries are −inf in both (a padded vocabulary); `dead_row` makes the
    first token −inf everywhere in both.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = 0.6 * s + torch.randn(shape, generator=g) * scale
    if pad:
        s[..., -pad:] = float("-inf")
        t[..., -pad:] = float("-inf")
    if dead_row:
        s.view(-1, shape[-1])[0] = float("-inf")
        t.view(-1, shape[-1])[0] = float("-inf")
    return s, t, torch.rand(shape[:-1], generator=g) + 0.5


def topk_reference(student: Tensor, ids: Tensor, log_p: Tensor, *, direction: str = "forward",
                   tail: str = "bucket", temperature: float = 1.0) -> Tensor:
    """Per-token top-k KL (bucket or renormalize, as `topk_kl` defines them), float64 autograd."""
    lq = (student.double() / temperature).log_softmax(-1)
    lq_ids, lp = lq.gather(-1, ids), log_p.double()
    if tail == "renormalize":
        lq_ids, lp = lq_ids.log_softmax(-1), lp.log_softmax(-1)
    elif ids.shape[-1] < student.shape[-1]:  # append the tail outcome
        outside = torch.ones_like(lq, dtype=torch.bool).scatter(-1, ids, False)
        lq_tail = torch.where(outside, lq, -math.inf).logsumexp(-1, keepdim=True)
        p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
        lq_ids, lp = torch.cat([lq_ids, lq_tail], -1), torch.cat([lp, p_tail.log()], -1)
    a, la, lb = (lq_ids.exp(), lq_ids, lp) if direction == "reverse" else (lp.exp(), lp, lq_ids)
    return _kl_terms(a, la, lb).sum(-1)


def distinct_ids(seed: int, lead: tuple[int, ...], vocab: int, k: int) -> Tensor:
    """k distinct random ids in [0, vocab) per token, int64 `[*lead, k]`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, vocab, generator=g).argsort(-1)[..., :k]
