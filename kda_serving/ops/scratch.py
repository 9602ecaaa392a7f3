"""Per-device scratch buffers that kernels reuse across calls (DESIGN.md: no allocation per call).

A buffer is taken when a call needs more than any before it, at least a quarter more each time, so
a server whose batches grow token by token reallocates a few dozen times, not once per size; then
every call reuses it. Calls on one stream run one after another, so one buffer serves them all.
A CUDA graph bakes the buffer's address in: a call being captured records it (``note_captured``)
and an outgrown buffer is freed only if no capture used it. A capture must not be the first call
of its size (that call would allocate inside the graph's memory pool)."""

from __future__ import annotations

import torch


class DeviceScratch:
    """One growing buffer of ``dtype`` per device."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict = {}     # device -> the buffer in use
        self.outgrown: list = []    # replaced buffers a captured CUDA graph still uses, kept alive
        self.captured: set = set()  # data pointers of buffers used inside a CUDA graph capture

    def get(self, device, numel: int) -> torch.Tensor:
        """A contiguous buffer of at least ``numel`` elements on ``device``."""
        buf = self.buffers.get(device)
        if buf is None or buf.numel() < numel:
            if buf is not None and buf.data_ptr() in self.captured:
                self.outgrown.append(buf)
            size = max(numel, 1) if buf is None else max(numel, buf.numel() + buf.numel() // 4)
            self.buffers.pop(device, None)
            buf = None  # the old one goes back to the allocator before the new one is taken
            buf = self.buffers[device] = torch.empty(size, dtype=self.dtype, device=device)
        return buf

    def note_captured(self, buf: torch.Tensor) -> None:
        """Records that a CUDA graph being captured uses ``buf``, so it is never freed."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self.captured.add(buf.data_ptr())

    def clear(self, device) -> None:
        """Drops ``device``'s buffer (tests)."""
        self.buffers.pop(device, None)
