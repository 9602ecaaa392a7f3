"""The opt-in build defines of the CUDA extension (csrc/common/build_options.h).

``setup.py`` compiles the extension with the defines named in ``KDA_SERVING_BUILD_DEFINES``
(space-separated, e.g. ``-DKDA_TC_STATE_WGMMA=1``); the built extension reports them back
(``kda_serving.ops._ext.build_options``), so benchmarks record which build they timed. This module
imports nothing from the package: setup.py loads it by path before anything is installed.
"""

from __future__ import annotations

# Bit i of the extension's build_options() mask is OPTIONS[i] (kBuildOptions in build_options.h).
OPTIONS = ("KDA_TC_STATE_WGMMA",)
ENV = "KDA_SERVING_BUILD_DEFINES"


def parse(text: str | None) -> list[str]:
    """``-DNAME=0|1`` flags from ``text``, each NAME one of OPTIONS; anything else is refused with
    the offending token named (a typo must not build the default silently)."""
    flags = []
    for token in (text or "").split():
        name, sep, value = token.removeprefix("-D").partition("=")
        if not token.startswith("-D") or name not in OPTIONS or sep != "=" or value not in ("0", "1"):
            raise ValueError(f"{ENV}: {token!r} is not -DNAME=0 or -DNAME=1 with NAME one of {', '.join(OPTIONS)}")
        flags.append(token)
    return flags


def names(mask: int) -> dict[str, int]:
    """The build_options() mask as {define: 0 or 1}."""
    return {name: (mask >> i) & 1 for i, name in enumerate(OPTIONS)}
