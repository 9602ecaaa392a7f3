"""KDA_SERVING_BUILD_DEFINES (kda_serving/build_defines.py): what setup.py accepts, and how a
build's options mask reads back."""

from pathlib import Path

import pytest

from kda_serving import build_defines as bd


def test_parse_accepts_the_known_defines():
    assert bd.parse(None) == [] and bd.parse("  ") == []
    assert bd.parse("-DKDA_TC_STATE_WGMMA=1 -DKDA_TC_STATE_WGMMA=0") == ["-DKDA_TC_STATE_WGMMA=1",
                                                                       "-DKDA_TC_STATE_WGMMA=0"]


@pytest.mark.parametrize("text,bad", [("-DKDA_TC_STATE_WGMA=1", None), ("-DKDA_TC_STATE_WGMMA", None),
                                      ("-DKDA_TC_STATE_WGMMA=2", None), ("KDA_TC_STATE_WGMMA=1", None), ("-O0", None),
                                      ("-DKDA_TC_WY_WGMMA=1", None),  # removed with the WY product
                                      ("-DKDA_TC_STATE_WGMMA=1 --use_fast_math", "--use_fast_math")])
def test_parse_refuses_anything_else_and_names_it(text, bad):
    with pytest.raises(ValueError, match="KDA_SERVING_BUILD_DEFINES") as e:
        bd.parse(text)
    assert repr(bad or text) in str(e.value)


def test_mask_bits_follow_build_options_h():
    src = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "build_options.h").read_text()
    for i, name in enumerate(bd.OPTIONS):
        assert f"({name} ? {1 << i} : 0)" in src
    assert bd.names(0) == {n: 0 for n in bd.OPTIONS}
    assert bd.names(1) == {"KDA_TC_STATE_WGMMA": 1}
