"""Batch buffers that are reused, not allocated afresh for every batch.

A fresh 50 MB batch buffer costs a page fault per 4 KiB page when it is first written, and in
shared memory once more when the main process first reads it: more CPU than scaling the values
into it. An `Arena` keeps a few slots, each holding the large arrays of one batch (`MOD`, and in
padded batches `MOD_dates` and `MOD_valid`), and hands a slot out again only once nothing refers
to the batch it held.

The contract: a batch's tensors stay intact for as long as anything references any of them. Each
batch gets its own owner array over its slot; every tensor of the batch keeps it alive (tensor ->
numpy view -> owner), and when the last one dies the owner's finalizer marks the slot free. A
consumer does nothing special: a batch it keeps stays as it was (its slot stays busy and, once all
slots are busy, batches get fresh buffers); one it drops, or whose tensors it replaces by device
copies, gives its slot back. Collate writes every byte of a slot's arrays, padding included, so
a reused slot yields exactly the batch a fresh one would.

In a data-loader worker the slots are shared memory. A slot's storage crosses to the main process
once, with its first batch (torch passes its file descriptor); later batches carry only their
layout. The slot's first byte is its busy flag: set by the worker, cleared by the main process.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

ALIGN = 64  # bytes: each array starts on a cache line; the first ALIGN bytes hold the busy flag
MAX_SLOTS = 4  # per arena: prefetched batches, the one in use, and a few the consumer still holds

Layout = dict[str, tuple[tuple[int, ...], type]]  # name -> (shape, dtype)
Buffer = tuple[torch.Tensor, np.ndarray]  # a batch array as a tensor, and a numpy view to fill


def _offsets(layout: Layout) -> tuple[dict[str, int], int]:
    """Byte offset of each array in a slot, and the bytes the slot needs."""
    offsets, n = {}, ALIGN
    for name, (shape, dtype) in layout.items():
        offsets[name] = n
        n += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
    return offsets, n


def _carve(mem: np.ndarray, layout: Layout, offsets: dict[str, int]) -> dict[str, Buffer]:
    """The arrays of `layout` over `mem` (uint8), as tensors and numpy views of them."""
    out = {}
    for name, (shape, dtype) in layout.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        a = mem[offsets[name] : offsets[name] + size].view(dtype).reshape(shape)
        out[name] = torch.from_numpy(a), a
    return out


def _owned(slot: np.ndarray, layout: Layout, offsets: dict[str, int], nbytes: int) -> dict[str, Buffer]:
    """The arrays of one batch over `slot`, all views of one new owner array that frees the slot.

    The owner wraps a memoryview, so numpy stops there when it collapses view chains: every array
    (and tensor) returned keeps this batch's owner alive, and the slot is released when it dies.
    """
    owner = np.frombuffer(memoryview(slot[:nbytes]), np.uint8)
    weakref.finalize(owner, slot.__setitem__, 0, 0).atexit = False
    return _carve(owner, layout, offsets)


def fresh(layout: Layout, shared: bool = False) -> dict[str, Buffer]:
    """Buffers of their own (no arena, or a full one): in a worker, shared memory torch will not copy."""
    out = {}
    for name, (shape, dtype) in layout.items():
        if shared:
            t = torch.from_numpy(np.empty(0, dtype))
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * t.element_size())
            t = t.new_empty(0).set_(storage, 0, shape)
            out[name] = t, t.numpy()
        else:
            a = np.empty(shape, dtype)
            out[name] = torch.from_numpy(a), a
    return out


def _bytes(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 numpy view of a whole storage."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).numpy()


class Arena:
    """Slots for the large arrays of batches, reused once released (see the module docstring).

    `shared`: the arena of a data-loader worker, whose batches `pack` readies for the main
    process's `Receiver`; otherwise batches are consumed in this process.
    """

    def __init__(self, shared: bool, max_slots: int = MAX_SLOTS):
        self.shared, self.max_slots = shared, max_slots
        self.slots: list[np.ndarray] = []  # uint8; byte 0 is the busy flag
        self.storages: list[torch.UntypedStorage | None] = []  # shared: sent with the slot's first batch
        self._packing: tuple[int, Layout, dict[str, int], int] | None = None

    def _slot(self, nbytes: int) -> int | None:
        for i, s in enumerate(self.slots):
            if s[0] == 0 and len(s) >= nbytes:
                return i
        if len(self.slots) == self.max_slots:
            return None
        size = nbytes + nbytes // 4  # room for batches a little larger (more dates, more tokens)
        if self.shared:
            storage = torch.UntypedStorage._new_shared(size)  # zero-filled: the flag reads free
            self.storages.append(storage)
            self.slots.append(_bytes(storage))
        else:
            self.slots.append(np.zeros(size, np.uint8))
        return len(self.slots) - 1

    def buffers(self, layout: Layout) -> dict[str, Buffer]:
        """Uninitialized arrays for one batch, in a free slot if there is one."""
        offsets, nbytes = _offsets(layout)
        i = self._slot(nbytes)
        if i is None:
            return fresh(layout, self.shared)
        slot = self.slots[i]
        slot[0] = 1
        if self.shared:  # the worker fills the slot; the main process's owner releases it
            self._packing = (i, layout, offsets, nbytes)
            return _carve(slot, layout, offsets)
        return _owned(slot, layout, offsets, nbytes)

    def pack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A worker's batch ready to cross: its slot's arrays become `None`, their layout `_arena`,
        and its other (small) tensors numpy arrays, pickled inline rather than each sent as a
        shared-memory file descriptor."""
        if not self.shared:
            return batch
        slot = None
        if self._packing is not None:
            i, layout, offsets, nbytes = self._packing
            self._packing = None
            for name in layout:
                batch[name] = None
            storage, self.storages[i] = self.storages[i], None
            slot = i, storage, layout, offsets, nbytes
        inline = {}  # bytes, not numpy arrays: the DataLoader's worker would turn those into tensors
        for name, v in batch.items():
            if isinstance(v, torch.Tensor) and not v.is_shared():
                inline[name] = bytearray(v.numpy().tobytes()), v.numpy().dtype.str, tuple(v.shape)
        batch.update(dict.fromkeys(inline))
        batch["_arena"] = slot, inline
        return batch


class Receiver:
    """The main process's side of the workers' arenas: maps each slot once, rebuilds batches."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.slots: dict[tuple[int, int], tuple[torch.UntypedStorage, np.ndarray]] = {}

    def unpack(self, batch: dict[str, Any], worker: int) -> dict[str, Any]:
        """A batch from `worker`'s `Arena.pack` as tensors (pinned when the loader pins)."""
        got = batch.pop("_arena", None)
        if got is None:  # not from a worker
            return batch
        slot, inline = got
        for name, (data, dtype, shape) in inline.items():
            t = torch.from_numpy(np.frombuffer(data, dtype).reshape(shape))
            batch[name] = t.pin_memory() if self.pin else t
        if slot is not None:
            i, storage, layout, offsets, nbytes = slot
            if storage is not None:
                self.slots[worker, i] = storage, _bytes(storage)
            for name, (t, _) in _owned(self.slots[worker, i][1], layout, offsets, nbytes).items():
                batch[name] = t.pin_memory() if self.pin else t  # a pinned copy frees the slot at once
        return batch
