"""scripts/ab_json.py: the ab stage's listing as JSON rows, a variant without a result kept as an error row."""

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LISTING = """### . kimi 1 8192 96
NVIDIA H100 80GB HBM3, 132 SMs, clock 1.98 GHz; N=1 L=8192 H=96 kimi gate: prepare 12288 CTAs 1.345 ms, state 96 CTAs (128 rows) 0.632 ms, total 1.977 ms
### .:-DKDA_TC_WY_WGMMA=1 kimi 1 8192 96
timeout: failed to run command '/out/.ab_tc_1': No such file or directory
### .devtmp/t64 conv
NVIDIA H100 80GB HBM3; N=1 L=16384 D=12288 W=4: conv prefill 0.517 ms (median of 20), floor 0.269 ms at 2999 GB/s copy bandwidth, 0.519 of the floor
### . bounded 1 8192 96
"""


def test_ab_listing_to_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    ab_json = importlib.import_module("ab_json")
    src, out = tmp_path / "ab.txt", tmp_path / "ab.json"
    src.write_text(LISTING)
    assert ab_json.main([str(src), str(out), "--commit", "abc1234"]) == 0
    record = json.loads(out.read_text())
    assert record["device"] == "NVIDIA H100 80GB HBM3" and record["commit"] == "abc1234"
    tc, missing, conv, last = record["runs"]
    assert tc == {"variant": ".", "case": "kimi 1 8192 96", "shape": "N1 L8192 H96", "gate": "kimi",
                  "prepare_ctas": 12288, "prepare_ms": 1.345, "state_ctas": 96, "state_rows": 128,
                  "state_ms": 0.632, "total_ms": 1.977}
    assert missing["variant"] == ".:-DKDA_TC_WY_WGMMA=1" and missing["error"] == "no result"
    assert "failed to run" in missing["output"]
    assert conv["shape"] == "N1 L16384 D12288 W4" and conv["hbm_floor_fraction"] == 0.519 and conv["copy_gbps"] == 2999
    assert last == {"variant": ".", "case": "bounded 1 8192 96", "error": "no result"}
