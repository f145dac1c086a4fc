"""Batch buffers that are reused, not allocated afresh for every batch, and cross processes whole.

A fresh 50 MB batch buffer costs a page fault per 4 KiB page when it is first written, and in
shared memory once more when the main process first reads it: more CPU than scaling the values
into it. Every array of a batch lives in one buffer: a slot of an `Arena` when one is free, else
a buffer of its own. An arena keeps a few slots and hands one out again only once its batch is
released. Collate writes every byte of a batch's arrays, padding included, so a reused slot
yields exactly the batch a fresh one would.

A batch travels as its non-tensor values plus one `Parcel` (the buffer and the layout of its
arrays). At the consumer the parcel becomes the batch's tensors, in one of two ways:

- mapped (no pinning): the tensors are views of the buffer. Each batch gets its own owner array
  over its slot; every tensor keeps it alive (tensor -> numpy view -> owner), and when the last one
  dies the owner's finalizer marks the slot free. A batch the consumer keeps stays as it was (its
  slot stays busy and, once all slots are busy, batches get buffers of their own); one it drops,
  or whose tensors it replaces by device copies, gives its slot back.
- pinned: torch's DataLoader pin-memory thread calls `Parcel.pin_memory`, which copies the whole
  buffer into one pinned buffer (one memcpy per batch) and releases the slot at once; the tensors
  are views of the pinned copy.

In a data-loader worker the slots are shared memory. A slot's storage crosses to the main process
once, with its first batch (torch passes its file descriptor), and is mapped there once (`_MAPPED`,
keyed by the worker arena's token); later batches carry only their layout. The slot's first byte
is its busy flag: set by the worker, cleared by the main process.
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

# Main process: the bytes of every worker slot seen, mapped once; (arena token, slot) -> uint8 view.
_MAPPED: dict[tuple[str, int], np.ndarray] = {}


def _offsets(layout: Layout) -> tuple[dict[str, int], int]:
    """Byte offset of each array in a buffer, and the bytes the buffer needs."""
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


def _torch_dtype(dtype: type) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _views(buf: torch.Tensor, layout: Layout, offsets: dict[str, int]) -> dict[str, torch.Tensor]:
    """The arrays of `layout` as tensor views of one uint8 tensor (a pinned copy)."""
    out = {}
    for name, (shape, dtype) in layout.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out[name] = buf[offsets[name] : offsets[name] + size].view(_torch_dtype(dtype)).view(shape)
    return out


def _bytes(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 numpy view of a whole storage."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).numpy()


def fresh(layout: Layout) -> dict[str, Buffer]:
    """The arrays of `layout` in one new buffer of this process (no arena)."""
    offsets, nbytes = _offsets(layout)
    return _carve(np.empty(nbytes, np.uint8), layout, offsets)


class Parcel:
    """One batch's arrays on their way to the consumer: a buffer and the layout over it.

    `slot` is the arena slot the buffer is (None: a buffer of its own); `storage` the shared
    memory that crosses with it (a slot's first batch, or an own buffer); `mem` its bytes in this
    process (dropped when pickled: the receiver maps `storage`, or the slot it mapped before).
    """

    def __init__(self, token: str, slot: int | None, storage: torch.UntypedStorage | None,
                 mem: np.ndarray, layout: Layout, offsets: dict[str, int], nbytes: int):  # fmt: skip
        self.token, self.slot, self.storage, self.mem = token, slot, storage, mem
        self.layout, self.offsets, self.nbytes = layout, offsets, nbytes
        self.pinned: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mem": None}

    def _memory(self) -> np.ndarray:
        if self.mem is None:
            if self.storage is not None:
                self.mem = _bytes(self.storage)
                if self.slot is not None:
                    _MAPPED[self.token, self.slot] = self.mem
            else:
                self.mem = _MAPPED[self.token, self.slot]
            self.storage = None
        return self.mem

    def pin_memory(self, device: Any = None) -> Parcel:
        """torch's pin-memory hook (`DataLoader(pin_memory=True)` calls it in its pin thread):
        one pinned copy of the whole buffer; the slot is free again at once."""
        mem = self._memory()
        self.pinned = torch.from_numpy(mem[: self.nbytes]).pin_memory()
        if self.slot is not None:
            mem[0] = 0
        self.mem = None
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's arrays: views of the pinned copy, or of the buffer (see the module docstring)."""
        if self.pinned is not None:
            return _views(self.pinned, self.layout, self.offsets)
        mem = self._memory()
        self.mem = None
        if self.slot is None:
            got = _carve(mem, self.layout, self.offsets)
        else:
            got = _owned(mem, self.layout, self.offsets, self.nbytes)
        return {name: t for name, (t, _) in got.items()}


def unpack(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch from `Arena.pack` (pinned or not) with its arrays back as tensors."""
    parcel = batch.pop("_parcel", None)
    if parcel is not None:
        batch.update(parcel.tensors())
    return batch


def forget(token_prefix: str) -> None:
    """Unmap the worker slots of arenas whose token starts with `token_prefix` (their workers are gone)."""
    for key in [k for k in _MAPPED if k[0].startswith(token_prefix)]:
        del _MAPPED[key]


class Arena:
    """Slots for the arrays of batches, reused once released (see the module docstring).

    `shared`: the arena of a data-loader worker (shared-memory buffers); `token` names it to the
    main process, unique among the arenas whose batches reach it.
    """

    def __init__(self, shared: bool, token: str = "", max_slots: int = MAX_SLOTS):
        self.shared, self.token, self.max_slots = shared, token, max_slots
        self.slots: list[np.ndarray] = []  # uint8; byte 0 is the busy flag
        self.storages: list[torch.UntypedStorage | None] = []  # shared: sent with the slot's first batch
        self._filling: Parcel | None = None

    def _new(self, nbytes: int) -> tuple[torch.UntypedStorage | None, np.ndarray]:
        if self.shared:
            storage = torch.UntypedStorage._new_shared(nbytes)  # zero-filled: a slot's flag reads free
            return storage, _bytes(storage)
        return None, np.zeros(nbytes, np.uint8)

    def _slot(self, nbytes: int) -> int | None:
        for i, s in enumerate(self.slots):
            if s[0] == 0 and len(s) >= nbytes:
                return i
        if len(self.slots) == self.max_slots:
            return None
        storage, mem = self._new(nbytes + nbytes // 4)  # room for a little larger batches (more dates)
        self.storages.append(storage)
        self.slots.append(mem)
        return len(self.slots) - 1

    def buffers(self, layout: Layout) -> dict[str, Buffer]:
        """Uninitialized arrays for one batch, in a free slot if there is one; `pack` sends them."""
        offsets, nbytes = _offsets(layout)
        i = self._slot(nbytes)
        if i is None:
            storage, mem = self._new(nbytes)
        else:
            mem = self.slots[i]
            mem[0] = 1
            storage, self.storages[i] = self.storages[i], None
        self._filling = Parcel(self.token, i, storage, mem, layout, offsets, nbytes)
        return _carve(mem, layout, offsets)

    def pack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch whose arrays came from the last `buffers`, ready to travel: those arrays
        replaced by one `_parcel`; `unpack` (after pinning or not) gives them back."""
        parcel, self._filling = self._filling, None
        if parcel is not None:
            for name in parcel.layout:
                del batch[name]
            batch["_parcel"] = parcel
        return batch
