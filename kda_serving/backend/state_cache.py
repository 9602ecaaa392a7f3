"""KDAStateCache: per-layer conv and recurrent pools, slot allocation, forks and memory accounting.

Slot 0 is reserved as the null slot (the kernels skip slots <= 0), so a pool for R requests has
R·(1 + num_spec) + 1 rows.
"""

from __future__ import annotations

import torch


class KDAStateCache:
    def __init__(self, *, num_layers, max_requests, num_heads, head_dim, conv_width=4,
                 num_spec_tokens=0, state_dtype=torch.float32, conv_dtype=torch.bfloat16,
                 device="cpu"):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype: expected float32 or bfloat16, got {state_dtype}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.conv_width, self.num_spec_tokens = conv_width, num_spec_tokens
        self.slots_per_request = 1 + num_spec_tokens
        self.num_slots = max_requests * self.slots_per_request + 1
        conv_rows = conv_width - 1 + num_spec_tokens
        conv_dim = 3 * num_heads * head_dim
        self.conv = [torch.zeros(self.num_slots, conv_rows, conv_dim, dtype=conv_dtype, device=device)
                     for _ in range(num_layers)]
        self.state = [torch.zeros(self.num_slots, num_heads, head_dim, head_dim, dtype=state_dtype,
                                  device=device) for _ in range(num_layers)]
        self._free = list(range(self.num_slots - 1, 0, -1))
        self._owned: dict[object, list[int]] = {}

    def allocate(self, request_id) -> list[int]:
        """Reserve ``1 + num_spec_tokens`` zeroed slots for a request."""
        if request_id in self._owned:
            raise ValueError(f"request_id: {request_id!r} already holds slots")
        if len(self._free) < self.slots_per_request:
            raise RuntimeError(f"KDA state cache full: {self.num_slots - 1} slots all in use")
        slots = [self._free.pop() for _ in range(self.slots_per_request)]
        for c, s in zip(self.conv, self.state):
            c[slots] = 0
            s[slots] = 0
        self._owned[request_id] = slots
        return slots

    def release(self, request_id) -> None:
        slots = self._owned.pop(request_id)
        self._free.extend(reversed(slots))

    def slots_of(self, request_id) -> list[int]:
        return self._owned[request_id]

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def copy_slot(self, src: int, dst: int) -> None:
        """Fork a request's state (prefix-cache hit): every layer's conv and recurrent rows."""
        for name, s in (("src", src), ("dst", dst)):
            if not 0 < s < self.num_slots:
                raise ValueError(f"{name}: slot {s} out of range 1..{self.num_slots - 1}")
        for c, s in zip(self.conv, self.state):
            c[dst] = c[src]
            s[dst] = s[src]

    def bytes_per_request_per_layer(self) -> int:
        """Recurrent plus conv state bytes one request holds in one layer (constant in context)."""
        state = self.state[0][0].numel() * self.state[0].element_size() if self.state else 0
        conv = self.conv[0][0].numel() * self.conv[0].element_size() if self.conv else 0
        return (state + conv) * self.slots_per_request

    @staticmethod
    def state_bytes(num_heads, head_dim, conv_width=4, state_dtype=torch.float32,
                    conv_dtype=torch.bfloat16) -> int:
        """Per-request, per-layer bytes without allocating a cache."""
        es = torch.empty(0, dtype=state_dtype).element_size()
        ec = torch.empty(0, dtype=conv_dtype).element_size()
        return num_heads * head_dim * head_dim * es + (conv_width - 1) * 3 * num_heads * head_dim * ec

    @staticmethod
    def requests_fitting(budget_bytes: int, per_request_bytes: int) -> int:
        """How many concurrent requests a memory budget holds."""
        return budget_bytes // per_request_bytes if per_request_bytes > 0 else 0
