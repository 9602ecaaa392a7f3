"""What a plain device-to-device copy reaches at decode-sized traffic, timed as bench_decode.py
times a decode step (CUDA graph of 8 calls over 4 buffer sets, median replay), as a fraction of
the 1 GiB copy bandwidth that the other benchmarks' HBM floors use.

A decode step moves tens of MB per call; at that size a kernel's ramp and tail are a visible part
of its time, and this is the fraction of the floor that a copy of the same traffic gets.

    python scripts/bench_copy.py [--sizes-mb 8 16 32 64 128] [--out DIR] [--smoke]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import bench_common as bc


def main(argv=None) -> Path:
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                   help="bytes copied per call (read once, written once), MiB")
    args = p.parse_args(argv)
    device = bc.pick_device(args.device)
    if args.smoke:
        args.sizes_mb = [1]
    bandwidth = bc.copy_bandwidth(device)
    meta = bc.run_metadata("bench_copy", device, sys.argv[1:] if argv is None else argv, bandwidth)
    rows = []
    for mb in args.sizes_mb:
        n = mb << 20
        sets = [(torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device))
                for _ in range(4)]
        fns = [lambda s=s, d=d: d.copy_(s) for s, d in sets]
        ms = bc.graph_time_ms(fns, device, reps=8, samples=30)
        floor = bc.floor_ms(2 * n, bandwidth)
        rows.append({"case": f"copy {mb} MiB", "copy_mib": mb, "us": ms * 1e3, "floor_us": floor * 1e3,
                     "hbm_floor_fraction": floor / ms})
        print(f"copy {mb:4d} MiB  {ms * 1e3:8.1f} us  floor {floor * 1e3:8.1f} us  fraction {floor / ms:.3f}",
              flush=True)
        del sets, fns
    path = bc.write_json(args.out, meta, rows, mode="smoke" if args.smoke else "default")
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
