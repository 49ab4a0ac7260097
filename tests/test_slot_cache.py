"""The continuous engine's in-place KV cache against the same operations done on plain tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from simple_generation.engines.slot_cache import SlotCache


def prefill(rows: int, width: int, layers: int = 2, seed: int = 0) -> DynamicCache:
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(torch.randn(rows, 2, width, 4, generator=generator),
                     torch.randn(rows, 2, width, 4, generator=generator), layer)
    return cache


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[2], 0))


def assert_same(cache: SlotCache, reference: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (keys, values) in zip(cache.layers, reference, strict=True):
        assert layer.keys.shape == keys.shape and torch.equal(layer.keys, keys)
        assert torch.equal(layer.values, values)
        assert layer.get_seq_length() == keys.shape[2]


def test_admit_decode_retire_and_crop_match_plain_tensors():
    first = prefill(3, 5, seed=1)
    reference = [(layer.keys.clone(), layer.values.clone()) for layer in first.layers]
    cache = SlotCache(first, slots=3, room=2)   # too few slots and columns: both must grow
    assert_same(cache, reference)

    # decoding steps write one column each, past the room
    for step in range(4):
        new = [(torch.full((3, 2, 1, 4), float(step + 10 * i)), torch.full((3, 2, 1, 4), -float(step + 10 * i)))
               for i in range(2)]
        for index, (k, v) in enumerate(new):
            cache.update(k, v, index)
        reference = [(torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(reference, new)]
        assert_same(cache, reference)

    # admitting narrower rows pads them; wider rows pad the running ones
    for rows, width, seed in ((2, 4, 2), (1, 15, 3)):
        extra = prefill(rows, width, seed=seed)
        cache.add(extra, slots=8)
        total = max(reference[0][0].shape[2], width)
        reference = [(torch.cat([left_pad(k, total), left_pad(layer.keys, total)]),
                      torch.cat([left_pad(v, total), left_pad(layer.values, total)]))
                     for (k, v), layer in zip(reference, extra.layers)]
        assert_same(cache, reference)

    # rows 0, 2 and 3 leave: the last rows fill their slots; the first two columns are dropped
    keep = [1, 4, 5]
    order = cache.keep(keep, trim=2)
    assert sorted(order) == keep
    reference = [(k[order][:, :, 2:], v[order][:, :, 2:]) for k, v in reference]
    assert_same(cache, reference)

    # a failed step is undone
    width = reference[0][0].shape[2]
    cache.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4), 0)
    cache.crop_to(width)
    assert_same(cache, reference)
    assert cache.allocated_bytes >= sum(k.numel() * 4 * 2 for k, _ in reference)


def test_reused_slots_never_show_stale_values():
    cache = SlotCache(prefill(4, 6, seed=4), slots=4, room=8)
    cache.keep([0], trim=0)                    # three slots freed, holding old values
    extra = prefill(3, 2, seed=5)              # narrower: padded with zeros, not with the old values
    cache.add(extra, slots=4)
    for layer, new in zip(cache.layers, extra.layers):
        assert torch.equal(layer.keys[1:, :, :4], torch.zeros(3, 2, 4, 4))
        assert torch.equal(layer.keys[1:, :, 4:], new.keys)
