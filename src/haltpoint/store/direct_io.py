"""Writing a local file at the disk's speed: large aligned writes, O_DIRECT where allowed.

`AlignedFileWriter` takes a stream of byte ranges (tensor data, in file order). A range whose
memory address has the same offset within a page as its place in the file (staging lays its
buffers out that way, see `staging`) is written by O_DIRECT straight from that memory: no
copy. Other bytes are copied into reused page-aligned bounce buffers. Two I/O threads write
with `os.pwrite`, so two writes are in flight while the calling thread hashes the next
chunk (see `tensor_writer`); copies (`torch.Tensor.copy_`), hashes and writes release the
GIL. With O_DIRECT the page cache is bypassed (no second copy of the data in memory, no
write-back storm at fsync); the last block is padded and the file then truncated to its
exact length. The caller must not change the memory of a range it wrote until `close`.

O_DIRECT is deliberately optional: where the file system refuses it (tmpfs, some network
and overlay file systems answer EINVAL on open or on the first write), the same file is
written with ordinary buffered writes, then fsynced. `AlignedFileWriter.direct` says which
way a file was written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import threading
from types import TracebackType

import torch

from haltpoint.store.storage import fsync_dir, open_unlinked

__all__ = ["ALIGN", "BOUNCE_BYTES", "AlignedFileWriter"]

ALIGN = 4096
"""Alignment of O_DIRECT buffers, lengths and file offsets (covers 512 and 4096 sectors)."""
BOUNCE_BYTES = 16 << 20
"""Size of one write: large enough to reach the device's bandwidth with one write in flight."""
_DEPTH = 3  # bounce buffers per file: one being filled, two being written
_WRITERS = 2  # I/O threads: writes in flight at once
_ZERO_COPY_MIN = 4 * ALIGN  # shorter ranges are copied: not worth a write of their own

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_free: list[mmap.mmap] = []  # bounce buffers kept across files: fresh pages fault slowly
_free_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    with _free_lock:
        if _free:
            return _free.pop()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, BOUNCE_BYTES, flags=flags)


def _give_back(buf: mmap.mmap) -> None:
    with _free_lock:
        if len(_free) < 2 * _DEPTH:
            _free.append(buf)


class AlignedFileWriter:
    """Writes a new local file from byte ranges, in large aligned writes on a second thread.

    Args:
        path: the file to create (truncated if it exists; `LinkedFileError` if it is a
            symbolic link).
        direct: try O_DIRECT; with False, or where the file system refuses it, the file is
            written with buffered writes. Either way it is fsynced by `close`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.bin")
    >>> with AlignedFileWriter(path) as w:
    ...     w.write(torch.arange(5, dtype=torch.uint8))
    >>> open(path, "rb").read()
    b'\\x00\\x01\\x02\\x03\\x04'
    """

    def __init__(self, path: str, *, direct: bool = True) -> None:
        self.path = path
        self.direct = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = -1
        if direct and _O_DIRECT:
            try:
                fd = open_unlinked(path, flags | _O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if fd < 0:
            fd = open_unlinked(path, flags)
        self._fd = fd
        self._opened_direct = self.direct
        self._fallback = threading.Lock()  # two I/O threads may meet a refusal at once
        self._size = 0  # bytes accepted so far
        self._buffers = [_take_buffer() for _ in range(_DEPTH)]
        self._tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in self._buffers]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(1, _DEPTH):
            self._free.put(i)
        # (bounce buffer index or -1, the bytes, file offset); None stops one I/O thread
        self._todo: queue.Queue[tuple[int, memoryview, int] | None] = queue.Queue()
        self._current, self._fill = 0, 0
        self._error: BaseException | None = None
        self._closed = False
        self.zero_copy_bytes = 0
        """Bytes written straight from the caller's memory, without a copy."""
        self._threads = [
            threading.Thread(target=self._run, name="haltpoint-io", daemon=True)
            for _ in range(_WRITERS)
        ]
        for thread in self._threads:
            thread.start()

    # -- the calling thread ---------------------------------------------------------------

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of `data` (a contiguous CPU uint8 tensor) to the file."""
        if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
            raise ValueError("write takes a flat, contiguous uint8 tensor")
        pos, total = 0, data.numel()
        if self.direct and total >= _ZERO_COPY_MIN:
            pos = self._write_in_place(data)
        self._copy(data, pos)

    def _write_in_place(self, data: torch.Tensor) -> int:
        """Queue the page-aligned middle of `data` for writing from its own memory.

        Only when the address of `data` and its place in the file are equally misaligned:
        then the bytes up to the next page boundary complete the bounce buffer, which is
        written, and the whole pages after it go to the disk from `data` itself. Returns how
        many bytes of `data` were taken (the rest is copied as usual).
        """
        position = self._size + self._fill
        if (data.data_ptr() - position) % ALIGN:
            return 0
        head = -position % ALIGN
        body = (data.numel() - head) // ALIGN * ALIGN
        if body <= 0:
            return 0
        self._copy(data[:head], 0)
        if self._fill:  # now a whole number of pages
            self._flush(self._fill)
        view = data.numpy().data
        for i in range(head, head + body, BOUNCE_BYTES):
            n = min(BOUNCE_BYTES, head + body - i)
            self._raise_error()
            self._todo.put((-1, view[i : i + n], self._size))
            self._size += n
        self.zero_copy_bytes += body
        return head + body

    def _copy(self, data: torch.Tensor, pos: int) -> None:
        """Copy `data[pos:]` into bounce buffers, queueing each one as it fills."""
        total = data.numel()
        while pos < total:
            n = min(BOUNCE_BYTES - self._fill, total - pos)
            self._tensors[self._current][self._fill : self._fill + n].copy_(data[pos : pos + n])
            self._fill += n
            pos += n
            if self._fill == BOUNCE_BYTES:
                self._flush(BOUNCE_BYTES)

    def _flush(self, nbytes: int) -> None:
        self._raise_error()
        view = memoryview(self._buffers[self._current])[:nbytes]
        self._todo.put((self._current, view, self._size))
        self._size += nbytes
        self._current, self._fill = self._next_free(), 0

    def _next_free(self) -> int:
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._raise_error()
                if not all(t.is_alive() for t in self._threads):  # pragma: no cover
                    raise RuntimeError("the haltpoint I/O thread stopped") from None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write what is left, truncate to the exact length, fsync, close. Raises I/O errors."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fill:
                length = self._size + self._fill
                pad = -self._fill % ALIGN if self.direct else 0
                if pad:
                    self._tensors[self._current][self._fill : self._fill + pad].zero_()
                self._flush(self._fill + pad)
                self._size = length
            self._stop_threads()
            self._raise_error()
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self._stop_threads()
            os.close(self._fd)
            for buf in self._buffers:
                _give_back(buf)
            self._tensors.clear()
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Stop, close and delete the file (after an error on the calling side)."""
        if not self._closed:
            self._closed = True
            self._stop_threads()
            os.close(self._fd)
            for buf in self._buffers:
                _give_back(buf)
            self._tensors.clear()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _stop_threads(self) -> None:
        for thread in self._threads:
            if thread.is_alive():
                self._todo.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> AlignedFileWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    # -- the I/O thread -------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            index, view, offset = item
            if self._error is None:
                try:
                    self._pwrite(view, offset)
                except BaseException as exc:  # handed to the calling thread
                    self._error = exc
            del view, item
            if index >= 0:
                self._free.put(index)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done, retried = 0, False
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._opened_direct or retried:
                    raise
                # The file system accepted O_DIRECT on open but refuses these writes: go on
                # buffered (deliberate, and fsynced at close like every file). The other I/O
                # thread may have switched already; either way this write is retried once.
                retried = True
                with self._fallback:
                    fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                    if fl & _O_DIRECT:
                        fcntl.fcntl(self._fd, fcntl.F_SETFL, fl & ~_O_DIRECT)
                    self.direct = False
