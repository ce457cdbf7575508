"""Staging: a private host copy of every tensor, in buffers reused from one save to the next.

Copying into memory that already exists runs at memory speed; into fresh allocations it runs
at the speed of page faults (several times slower). `StagingPool` therefore keeps its buffers
across saves and reuses the one of a key whose shape and dtype did not change; new buffers
are pre-faulted in one go (`MAP_POPULATE`). CUDA tensors are copied into pinned buffers with
non-blocking copies, then the devices are synchronised once.

CPU states are staged into one page-aligned region laid out like the safetensors file the
writer will make of them (each tensor at its offset in the file, the header's room left
empty), so `direct_io` can write the whole file with O_DIRECT straight from the staged
memory, without copying it into bounce buffers. The region is kept while the layout (names,
dtypes, shapes) stays the same; a layout that changes from one save to the next falls back to
one buffer per tensor, each reused while its own shape and dtype stay the same.

The pool lends its buffers to one save at a time: `stage` waits until the previous save has
`release`d them, so a later save can never overwrite a state that is still being written.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Collection, Mapping

import torch

from haltpoint.errors import UnsupportedStateError

__all__ = [
    "PREFAULT_MIN_BYTES",
    "StagingPool",
    "prefaulted_bytes",
    "stage_tensors",
    "staged_nbytes",
]

PREFAULT_MIN_BYTES = 1 << 20
"""Buffers this large are mapped and pre-faulted in one system call; smaller ones come from
torch's allocator."""


def staged_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The bytes a staged copy of `tensors` takes."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def prefaulted_bytes(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of `nbytes` in fresh page-aligned memory, faulted in in one call."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(-1, max(nbytes, 1), flags=flags)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # keeps `region` alive


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """An empty contiguous host tensor shaped like `like`, its pages already faulted in."""
    if like.device.type == "cuda" and torch.cuda.is_available():
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
    nbytes = like.numel() * like.element_size()
    if nbytes < PREFAULT_MIN_BYTES:
        return torch.empty(like.shape, dtype=like.dtype)
    return prefaulted_bytes(nbytes).view(like.dtype).view(like.shape)


_Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


def _layout(tensors: Mapping[str, torch.Tensor]) -> _Layout | None:
    """What a file image depends on; None when the tensors cannot share one (not all CPU)."""
    if any(t.device.type != "cpu" for t in tensors.values()):
        return None
    return tuple(sorted((k, t.dtype, tuple(t.shape)) for k, t in tensors.items()))


def _file_image(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Buffers for `tensors` inside one pre-faulted region laid out as their safetensors file.

    Each buffer's address has the same offset within a page as the tensor's place in the file
    `tensor_writer.write_tensor_file` makes of exactly these tensors, so the writer can send
    it to the disk with O_DIRECT without a copy. None when no such file can be planned (the
    writer then reports why).
    """
    from haltpoint.store.direct_io import ALIGN
    from haltpoint.store.tensor_writer import plan_file

    try:
        plan = plan_file(tensors)
    except (UnsupportedStateError, ValueError):
        return None
    image = prefaulted_bytes(-plan.size % ALIGN + plan.size)
    buffers = {}
    for key in plan.order:
        begin, end = plan.spans[key]
        t = tensors[key]
        raw = image[plan.data_start + begin : plan.data_start + end]
        buffers[key] = raw.view(t.dtype).view(t.shape) if t.numel() else torch.empty_like(t)
    return buffers


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    devices = set()
    for dst, src in pairs:
        cuda = src.device.type == "cuda"
        dst.copy_(src.detach(), non_blocking=cuda)
        if cuda:
            devices.add(src.device)
    for device in devices:
        torch.cuda.synchronize(device)


def stage_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy each tensor to a new contiguous CPU tensor that training can no longer change.

    >>> t = torch.ones(2)
    >>> staged = stage_tensors({"w": t})
    >>> _ = t.add_(1)
    >>> staged["w"].tolist()
    [1.0, 1.0]
    """
    staged = {key: _host_buffer(t) for key, t in tensors.items()}
    _copy_all([(staged[key], t) for key, t in tensors.items()])
    return staged


class StagingPool:
    """Host buffers for staging, kept across saves; lent to one save at a time.

    Args:
        max_staging_bytes: the most host memory staging may hold (None: one copy of the state,
            whatever its size). A state larger than this is refused with `ValueError`.

    >>> pool = StagingPool()
    >>> w = torch.ones(3)
    >>> first = pool.stage({"w": w})
    >>> pool.release()
    >>> _ = w.mul_(2)
    >>> second = pool.stage({"w": w})
    >>> second["w"].tolist(), second["w"].data_ptr() == first["w"].data_ptr()
    ([2.0, 2.0, 2.0], True)
    >>> pool.release()
    """

    def __init__(self, *, max_staging_bytes: int | None = None) -> None:
        if max_staging_bytes is not None and (
            isinstance(max_staging_bytes, bool) or not isinstance(max_staging_bytes, int)
        ):
            raise TypeError(
                f"max_staging_bytes must be an int number of bytes or None, "
                f"got {max_staging_bytes!r}"
            )
        if max_staging_bytes is not None and max_staging_bytes <= 0:
            raise ValueError(
                f"max_staging_bytes must be a positive number of bytes or None, "
                f"got {max_staging_bytes!r}"
            )
        self.max_staging_bytes = max_staging_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self._layout: _Layout | None = None  # of the previous save
        self._image = False  # whether the buffers are one file image
        self._lent = False
        self._cond = threading.Condition()

    @property
    def nbytes(self) -> int:
        """Host memory held by the pool's buffers."""
        return staged_nbytes(self._buffers)

    def stage(
        self, tensors: Mapping[str, torch.Tensor], *, later: Collection[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Copy `tensors` into the pool's buffers and lend them until `release`.

        Waits while the buffers are lent to an earlier save. Buffers of keys whose shape,
        dtype or pinning changed, or that are gone, are dropped before new ones are made.
        The keys in `later` get their buffers but are not copied: the caller copies them
        (an overlapped copy, `haltpoint.store.overlap`).

        Raises:
            ValueError: the tensors take more than `max_staging_bytes`.
        """
        need = staged_nbytes(tensors)
        if self.max_staging_bytes is not None and need > self.max_staging_bytes:
            raise ValueError(
                f"the state holds {need} bytes of tensors, over max_staging_bytes="
                f"{self.max_staging_bytes}; raise max_staging_bytes, or save with "
                "async_save=False (written straight from the live tensors, no staging copy)"
            )
        with self._cond:
            while self._lent:
                self._cond.wait()
            self._lent = True
        try:
            self._allocate(tensors)
            _copy_all([(self._buffers[k], t) for k, t in tensors.items() if k not in later])
        except BaseException:
            self._buffers, self._layout, self._image = {}, None, False
            self.release()
            raise
        return dict(self._buffers)

    def _allocate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Make `self._buffers` fit `tensors`, keeping what fits.

        One file image when the layout is the previous save's (or the pool is empty), else one
        buffer per tensor: a layout that keeps changing never re-faults a whole image.
        """
        layout = _layout(tensors)
        stable = layout is not None and (layout == self._layout or not self._buffers)
        previous, self._layout = self._layout, layout
        if stable and self._image and layout == previous:
            return  # the image fits as it is
        old, self._buffers, self._image = self._buffers, {}, False
        if stable:
            del old  # free the old buffers before faulting in new ones
            image = _file_image(tensors)
            if image is not None:
                self._buffers, self._image = image, True
                return
            old = {}
        reuse = {k: old[k] for k, t in tensors.items() if k in old and _fits(old[k], t)}
        del old  # free what is no longer needed before allocating anything new
        for key, t in tensors.items():
            self._buffers[key] = reuse[key] if key in reuse else _host_buffer(t)

    def release(self) -> None:
        """Take the buffers back after the save they were lent to is written (or failed)."""
        with self._cond:
            self._lent = False
            self._cond.notify_all()


def _fits(buf: torch.Tensor, t: torch.Tensor) -> bool:
    pinned = t.device.type == "cuda" and torch.cuda.is_available()
    return (
        buf.shape == t.shape
        and buf.dtype == t.dtype
        and (not pinned or buf.is_pinned())
        and not (t.device.type == "cpu" and buf.is_pinned())
    )
