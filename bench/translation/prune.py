"""Physical filter pruning of a CycleGAN :class:`~bench.translation.cyclegan.Generator` by binary masks.

A generator's genome has five segments, one per filter group (``c1, d1, trunk, u1, u2``: the official
GAN-Pruning code's ``mask_chns``, whose third segment masks the second down-sampling conv and every residual
block's convolutions at once). :func:`prune` keeps the filters a mask keeps and slices every consumer's
input channels to match, giving a smaller :class:`Generator` of the same class. InstanceNorm has no
parameters and maps an all-zero channel to zero, so the pruned generator computes exactly what the full
generator computes with the removed filters zeroed (tests/test_translation.py checks it).

``l1_masks``: conventional filter pruning (Li, Kadav, Durdanovic, Samet, Graf, ICLR 2017), the paper's
baseline: in each segment the filters of largest L1 norm are kept (the trunk segment sums the norms of a
filter index over every conv that writes it).
"""
from __future__ import annotations

import torch
from torch import nn

from bench.evolution import Segment
from bench.translation.cyclegan import Generator


def keep_count(channels: int, ratio: float) -> int:
    """Filters a segment keeps at ``ratio``: the rule of ``pruned:l1`` (``C - int(C * (1 - ratio))``)."""
    return channels - int(channels * (1 - ratio))


def segments(generator: Generator, ratio: float) -> list[Segment]:
    """The genome layout of ``generator`` at ``ratio`` (bench.evolution's Segment: no taps are needed here)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio (fraction of filters kept) must be in (0, 1], got {ratio}")
    out, offset = [], 0
    for name, channels in zip(("c1", "d1", "trunk", "u1", "u2"), generator.widths):
        out.append(Segment(name, channels, keep_count(channels, ratio), offset, ()))
        offset += channels
    return out


def _writers(generator: Generator) -> dict[str, list[tuple[nn.Module, int]]]:
    """Per segment, the layers whose output filters it indexes and the weight axis of the output channel."""
    trunk = [(generator.d2, 0)] + [(c, 0) for block in generator.res for c in (block.conv1, block.conv2)]
    return {"c1": [(generator.c1, 0)], "d1": [(generator.d1, 0)], "trunk": trunk, "u1": [(generator.u1, 1)],
            "u2": [(generator.u2, 1)]}


def split(mask: torch.Tensor, segs: list[Segment]) -> dict[str, torch.Tensor]:
    """A flat genome -> the kept filter indices of each segment."""
    return {s.name: mask[s.offset:s.offset + s.channels].nonzero().flatten() for s in segs}


def prune(generator: Generator, mask: torch.Tensor, segs: list[Segment]) -> Generator:
    """A new :class:`Generator` holding the filters ``mask`` keeps (``mask``: a bool genome over ``segs``)."""
    keep = split(mask.bool(), segs)
    if any(k.numel() == 0 for k in keep.values()):
        raise ValueError(f"a mask must keep at least one filter per segment, got counts "
                         f"{ {n: int(k.numel()) for n, k in keep.items()} }")
    full = torch.arange(generator.channels)
    k1, k2, kt, k4, k5 = (keep[n] for n in ("c1", "d1", "trunk", "u1", "u2"))
    new = Generator(tuple(int(k.numel()) for k in (k1, k2, kt, k4, k5)), generator.blocks, generator.channels)

    def conv(dst: nn.Module, src: nn.Module, cin: torch.Tensor, cout: torch.Tensor, transposed: bool = False):
        w = src.weight.detach()
        w = w[cin][:, cout] if transposed else w[cout][:, cin]
        dst.weight.data.copy_(w)
        dst.bias.data.copy_(src.bias.detach()[cout])

    conv(new.c1, generator.c1, full, k1)
    conv(new.d1, generator.d1, k1, k2)
    conv(new.d2, generator.d2, k2, kt)
    for b_new, b_old in zip(new.res, generator.res):
        conv(b_new.conv1, b_old.conv1, kt, kt)
        conv(b_new.conv2, b_old.conv2, kt, kt)
    conv(new.u1, generator.u1, kt, k4, transposed=True)
    conv(new.u2, generator.u2, k4, k5, transposed=True)
    conv(new.out, generator.out, k5, full)
    return new.train(generator.training)


def l1_masks(generator: Generator, segs: list[Segment]) -> torch.Tensor:
    """The genome conventional L1-norm filter pruning keeps (per segment, the largest-norm filters)."""
    writers = _writers(generator)
    bits = []
    for s in segs:
        norms = sum(layer.weight.detach().abs().transpose(0, axis).flatten(1).sum(1) for layer, axis in writers[s.name])
        keep = torch.zeros(s.channels, dtype=torch.bool)
        keep[norms.topk(s.keep).indices] = True
        bits.append(keep)
    return torch.cat(bits)
