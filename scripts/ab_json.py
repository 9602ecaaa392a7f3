#!/usr/bin/env python3
"""The ``ab`` stage's listing (scripts/gpu_check.sh: ``### VARIANT CASE`` headers, then the lines
profile_tc_phases.cu -DKDA_TC_TIMING_ONLY and profile_conv.cu print) as JSON rows, one per run,
for benchmarks/results/.

    scripts/ab_json.py OUTDIR/ab.txt OUT.json [--commit C] [--note TEXT]

A header with no result line under it (a variant that failed to build or run) becomes a row with
``"error"``, so a missing variant is visible in the JSON and not only by its absence."""

from __future__ import annotations

import argparse
import json
import re
import sys

TC = re.compile(r"^(?P<device>.+?), (?P<sms>\d+) SMs, clock (?P<clock>[\d.]+) GHz; N=(?P<n>\d+) L=(?P<l>\d+) "
                r"H=(?P<h>\d+) (?P<gate>\w+) gate: prepare (?P<pc>\d+) CTAs (?P<pm>[\d.]+) ms, state (?P<sc>\d+) "
                r"CTAs \((?P<rows>\d+) rows\) (?P<sm>[\d.]+) ms, total (?P<tm>[\d.]+) ms")
CONV = re.compile(r"^(?P<device>.+?); N=(?P<n>\d+) L=(?P<l>\d+) D=(?P<d>\d+) W=(?P<w>\d+): conv prefill "
                  r"(?P<ms>[\d.]+) ms .*floor (?P<floor>[\d.]+) ms at (?P<bw>\d+) GB/s copy bandwidth, "
                  r"(?P<frac>[\d.]+) of the floor")


def parse(text: str) -> tuple[list[dict], str | None]:
    """(rows, device name) of an ab.txt listing."""
    rows: list[dict] = []
    device = None
    pending = None  # the last header's row until a result line fills it
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("### "):
            if pending is not None:
                rows.append(pending | {"error": "no result"})
            variant, _, case = line[4:].partition(" ")
            pending = {"variant": variant, "case": case}
            continue
        m = TC.match(line)
        if m and pending is not None:
            device = m["device"]
            rows.append(pending | {"shape": f"N{m['n']} L{m['l']} H{m['h']}", "gate": m["gate"],
                                   "prepare_ctas": int(m["pc"]), "prepare_ms": float(m["pm"]),
                                   "state_ctas": int(m["sc"]), "state_rows": int(m["rows"]),
                                   "state_ms": float(m["sm"]), "total_ms": float(m["tm"])})
            pending = None
            continue
        m = CONV.match(line)
        if m and pending is not None:
            device = m["device"]
            rows.append(pending | {"shape": f"N{m['n']} L{m['l']} D{m['d']} W{m['w']}", "ms": float(m["ms"]),
                                   "floor_ms": float(m["floor"]), "copy_gbps": int(m["bw"]),
                                   "hbm_floor_fraction": float(m["frac"])})
            pending = None
            continue
        if pending is not None and line:
            pending.setdefault("output", line)
    if pending is not None:
        rows.append(pending | {"error": "no result"})
    return rows, device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("listing")
    p.add_argument("out")
    p.add_argument("--commit", default=None)
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    with open(a.listing) as f:
        rows, device = parse(f.read())
    record = {"script": "scripts/gpu_check.sh ab (profile_tc_phases.cu -DKDA_TC_TIMING_ONLY, profile_conv.cu; "
                        "variants built side by side, run interleaved per case, medians of 7 runs)",
              "device": device, "commit": a.commit, "note": a.note, "runs": rows}
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    failed = [r for r in rows if "error" in r]
    print(f"{a.out}: {len(rows)} runs, {len(failed)} without a result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
