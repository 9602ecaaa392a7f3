"""Console entry point: `kda-serving serve | make-checkpoint | doctor`."""

from __future__ import annotations

import sys

USAGE = """usage: kda-serving COMMAND [ARGS...]

commands:
  serve [MODEL] [vLLM args...]   OpenAI-compatible server (vLLM) with our KDA layer
                                 (no MODEL: creates and serves the tiny checkpoint)
  make-checkpoint [options]      write a Kimi-Linear checkpoint in the official format
  doctor                         versions, GPU, extension and which KDA path runs
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "doctor":
        from .doctor import main as run
    elif cmd == "serve":
        from .serve import serve_main as run
    elif cmd == "make-checkpoint":
        from .checkpoints.cli import make_checkpoint_main as run
    else:
        print(f"kda-serving: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
