"""The continuous engine's KV cache: rows and columns in preallocated buffers, written in place.

transformers' ``DynamicCache`` concatenates every layer's keys and values at every decoding step, so a
step copies the whole cache (on a SmolLM-135M shape with 64 rows of 200 tokens, ~600 MB per step, as
much time as the step's matmuls), and removing a finished row copies it again. Here each layer owns a
buffer of ``(slots, kv heads, capacity, head dim)``; the running batch is the view
``buffer[:rows, :, start:end]``:

- a decoding step writes one column (``end`` advances); the buffer was sized at admission with room
  for the longest remaining answer, so it grows (one copy) only when that room runs out;
- a finished row is replaced by the last running row (one row copied, not the cache), and columns no
  running row uses any more are dropped by moving ``start``;
- admitted rows are written into free slots, left-padded to the batch's width (pads zeroed: a masked
  column still enters the attention product, and must be finite).

The model sees an ordinary ``DynamicCache`` whose layers return these views.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's keys and values: views of buffers with room to grow (see the module docstring)."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: int, room: int):
        super().__init__()
        rows, _, width, _ = keys.shape
        self.key_buffer, self.value_buffer = keys, values
        self.rows, self.start, self.end = rows, 0, width
        self.room = room
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._refresh()
        self.reallocate(max(slots, rows), 0, room)

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:self.rows, :, self.start:self.end]
        self.values = self.value_buffer[:self.rows, :, self.start:self.end]

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, columns) of the buffers."""
        return self.key_buffer.shape[0], self.key_buffer.shape[2]

    def reallocate(self, slots: int, left: int, right: int) -> None:
        """New buffers holding the running view with ``left``/``right`` free columns around it."""
        width = self.end - self.start
        buffers = []
        for old, view in ((self.key_buffer, self.keys), (self.value_buffer, self.values)):
            new = old.new_zeros((slots, old.shape[1], left + width + right, old.shape[3]))
            new[:self.rows, :, left:left + width].copy_(view)
            buffers.append(new)
        self.key_buffer, self.value_buffer = buffers
        self.start, self.end = left, left + width
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.end + new > self.key_buffer.shape[2]:
            self.reallocate(self.key_buffer.shape[0], 0, max(new, self.room, 16))
        for buffer, states in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            buffer[:self.rows, :, self.end:self.end + new].copy_(states)
        self.end += new
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.end - self.start

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, slots: int) -> None:
        """Append rows of width ``keys.shape[2]`` (already left-padded among themselves), right-aligned."""
        count, width = keys.shape[0], keys.shape[2]
        current = self.end - self.start
        total = max(current, width)
        have_slots, have_columns = self.capacity
        if self.rows + count > have_slots or self.end - total < 0 or self.end + 1 > have_columns:
            left = total - current
            self.reallocate(max(slots, self.rows + count), left, max(self.room, 1))
            self.start -= left   # the new columns on the left are the old rows' padding (zeroed)
        elif total > current:
            self.start -= total - current
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[:self.rows, :, self.start:self.start + total - current].zero_()
        rows = slice(self.rows, self.rows + count)
        for buffer, new in ((self.key_buffer, keys), (self.value_buffer, values)):
            buffer[rows, :, self.start:self.end - width].zero_()
            buffer[rows, :, self.end - width:self.end].copy_(new.to(buffer.device))
        self.rows += count
        self._refresh()

    def move_rows(self, holes: list[int], movers: list[int], rows: int, start: int) -> None:
        """Copy rows ``movers`` into ``holes``, keep the first ``rows`` rows and the columns from ``start``."""
        if holes:
            columns = slice(self.start, self.end)
            for buffer in (self.key_buffer, self.value_buffer):
                index = torch.tensor(movers, device=buffer.device)
                buffer[holes, :, columns] = buffer[:, :, columns].index_select(0, index)
        self.rows = rows
        self.start += start
        self._refresh()

    def crop_to(self, width: int) -> None:
        self.end = min(self.end, self.start + width)
        self._refresh()


class SlotCache(DynamicCache):
    """The running batch's cache (see the module docstring); made from a prefill's ``DynamicCache``.

    ``slots`` is how many rows the buffers hold before they must grow, ``room`` how many columns they
    hold past the current width (the longest answer still to come).
    """

    def __init__(self, prefill: DynamicCache, slots: int, room: int):
        super().__init__()
        self.layer_class_to_replicate = None
        self.layers = [SlotLayer(layer.keys, layer.values, slots, room) for layer in prefill.layers]

    @staticmethod
    def supports(prefill: DynamicCache) -> bool:
        """Whether every layer of a prefilled cache holds plain 4-d keys and values (no shared or empty layers)."""
        return all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                   and layer.keys.dim() == 4 for layer in prefill.layers)

    def set_room(self, room: int) -> None:
        for layer in self.layers:
            layer.room = room

    def add(self, prefill: DynamicCache, slots: int) -> None:
        """Add a prefill's rows, left-padding them (or the running rows) to the wider of the two."""
        for layer, new in zip(self.layers, prefill.layers, strict=True):
            layer.add_rows(new.keys, new.values, slots)

    def keep(self, keep: list[int], trim: int = 0) -> list[int]:
        """Keep the rows ``keep`` (ascending) and drop the first ``trim`` columns.

        Rows leaving make holes that the last running rows fill; returns, for each new row position, the
        old position it holds, so the caller reorders its own per-row state the same way.
        """
        rows = len(keep)
        kept = set(keep)
        holes = [i for i in range(rows) if i not in kept]
        movers = [i for i in keep if i >= rows]
        for layer in self.layers:
            layer.move_rows(holes, movers, rows, trim)
        order = list(range(rows))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        return order

    @property
    def allocated_bytes(self) -> int:
        buffers = [b for layer in self.layers for b in (layer.key_buffer, layer.value_buffer)]
        return sum(b.numel() * b.element_size() for b in buffers)

    def crop_to(self, width: int) -> None:
        """Undo a failed step: every layer back to ``width`` columns."""
        for layer in self.layers:
            layer.crop_to(width)
