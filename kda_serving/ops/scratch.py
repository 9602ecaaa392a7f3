"""Scratch buffers that kernels reuse across calls (DESIGN.md: no allocation per call).

A buffer is taken when a call needs more than any before it, at least a quarter more each time, so
a server whose batches grow token by token reallocates a few dozen times, not once per size; then
every call reuses it. There is one buffer per (device, stream): calls on one stream run one after
another, so one buffer serves them all, while calls on two streams (engines that overlap two
micro-batches) may run at once and get one each.
A CUDA graph bakes the buffer's address in: a call being captured records it (``note_captured``)
and an outgrown buffer is freed only if no capture used it. A capture that is the first call of its
size on its stream allocates the buffer inside the graph's memory pool, which works but keeps that
memory in the pool; warming up on the capture stream first avoids it."""

from __future__ import annotations

import torch


def _key(device) -> tuple:
    """(device with its index, current stream): "cuda" and "cuda:0" name one buffer."""
    device = torch.device(device)
    if device.type != "cuda":
        return device, 0
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.current_stream(device).cuda_stream


class DeviceScratch:
    """One growing buffer of ``dtype`` per (device, current stream)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict = {}     # (device, stream) -> the buffer in use
        self.outgrown: list = []    # replaced buffers a captured CUDA graph still uses, kept alive
        self.captured: set = set()  # data pointers of buffers used inside a CUDA graph capture

    def current(self, device) -> torch.Tensor | None:
        """The buffer calls on ``device``'s current stream use, if any."""
        return self.buffers.get(_key(device))

    def get(self, device, numel: int) -> torch.Tensor:
        """A contiguous buffer of at least ``numel`` elements on ``device``, for its current stream."""
        key = _key(device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None and buf.data_ptr() in self.captured:
                self.outgrown.append(buf)
            size = max(numel, 1) if buf is None else max(numel, buf.numel() + buf.numel() // 4)
            self.buffers.pop(key, None)
            buf = None  # the old one goes back to the allocator before the new one is taken
            buf = self.buffers[key] = torch.empty(size, dtype=self.dtype, device=key[0])
        return buf

    def note_captured(self, buf: torch.Tensor) -> None:
        """Records that a CUDA graph being captured uses ``buf``, so it is never freed."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self.captured.add(buf.data_ptr())

    def clear(self, device) -> None:
        """Drops ``device``'s buffers (tests)."""
        for key in [k for k in self.buffers if k[0] == _key(device)[0]]:
            del self.buffers[key]
