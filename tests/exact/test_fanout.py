"""A value with three or more consumers (docs/exact-spec.md, section 29): its
gradient is section 5's tree over the consumers' gradients in the order the
forward created them, not autograd's order; a parameter tied to the output
head and used a third time gets that sum through LayerNet."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.exact import Embedding, Guard, LayerNet, Linear, step_context
from pipeline.exact.fanout import fix_fanout, ordered_sum
from pipeline.exact.ops import softmax_xent

TINY = 2.0**-24


def _grad(fixed: bool, factors: list[float]) -> torch.Tensor:
    h = torch.ones(4, requires_grad=True)
    with Guard():
        terms = [h * f for f in factors]  # consumers in this order
        y = terms[0]
        for t in terms[1:]:
            y = y + t
    handles = fix_fanout(y) if fixed else []
    (g,) = torch.autograd.grad(y, h, torch.ones(4))
    for hd in handles:
        hd.remove()
    return g


def test_three_terms_are_summed_in_forward_order() -> None:
    """1 + 2^-24 + 2^-24: forward order's tree ((1 + 2^-24) + 2^-24) rounds to
    1 twice; the reverse order gives 1 + 2^-23. With the fixed sum the
    gradient is the forward order's; autograd alone (the control) gives
    another value, so the order was autograd's to pick."""
    got = _grad(True, [1.0, TINY, TINY])
    assert torch.equal(got, torch.full((4,), 1.0))
    assert not torch.equal(_grad(False, [1.0, TINY, TINY]), got)


def test_five_terms_follow_the_tree() -> None:
    """Five consumers: ((t0 + t1) + (t2 + t3)) + t4, the neighbour-pairing
    tree (not a left fold, which differs here)."""
    f = [1.0, TINY, TINY, TINY, TINY]
    tree = ordered_sum([torch.full((4,), v) for v in f])
    fold = torch.full((4,), f[0])
    for v in f[1:]:
        fold = fold + v
    assert not torch.equal(tree, fold)
    assert torch.equal(_grad(True, f), tree)


class _Tied(nn.Module):
    """An embedding read out by the head and by a second projection: with
    ``split`` False the three are one parameter (three consumers)."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.tok = Embedding(11, 6)
        self.head = Linear(6, 11, bias=False)
        self.extra = Linear(6, 11, bias=False)
        if not split:
            self.head.weight = self.tok.weight
            self.extra.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        return self.head(h) + self.extra(h) * 0.5


def test_tied_embedding_used_three_times() -> None:
    """LayerNet's gradient of an embedding tied to the head and used a third
    time equals the tree over the three uses' own gradients (computed with
    three untied copies of the weight) in forward order: embedding, head,
    extra; the plain autograd sum (control) differs."""
    x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(2))
    net = LayerNet(_Tied(False), seed=3, device="cpu", sample=x[:2])
    assert net.structure()["tied"] == {"extra.weight": "tok.weight", "head.weight": "tok.weight"}
    _, grads = net.shard_grads(x, y, x.numel(), None)
    w = net.params["tok.weight"]

    split = _Tied(True)
    with torch.no_grad():
        for p in split.parameters():
            p.copy_(w)
    with torch.enable_grad(), step_context(3, 0, 0), Guard():
        logits = split(x)
    _, g = softmax_xent(logits.detach().reshape(-1, 11), y.reshape(-1), x.numel())
    parts = torch.autograd.grad(logits, [split.tok.weight, split.head.weight,
                                         split.extra.weight], g.view(logits.shape))
    want = ordered_sum(list(parts))
    assert torch.equal(grads["tok.weight"], want)

    with torch.enable_grad(), step_context(3, 0, 0), Guard():
        again = net.module(x)
    (plain,) = torch.autograd.grad(again, [net.module.tok.weight], g.view(again.shape))
    assert not torch.equal(plain, want)


def test_a_tied_parameter_keeps_its_first_layers_draw() -> None:
    """Initialisation (section 16, tying in section 29): the embedding tied to
    two later projections keeps the embedding's own draw, as torch's
    ``head.weight = tok.weight`` keeps the embedding's values; control: the
    untied projections draw their own (other) values."""
    from pipeline.exact import init_exact
    tied, split = init_exact(_Tied(False), 5), init_exact(_Tied(True), 5)
    assert torch.equal(tied.tok.weight, split.tok.weight)
    assert not torch.equal(split.head.weight, split.tok.weight)
