"""kda-serving: Kimi Delta Attention kernels and engine plugins."""

__version__ = "0.1.0"
