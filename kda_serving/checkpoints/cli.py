"""``kda-serving make-checkpoint``: write a random-weight Kimi-Linear checkpoint."""

from __future__ import annotations

import argparse
import sys

from .layout import expected_tensors
from .presets import load_preset, preset_names, with_num_layers
from .tokenizer import write_tokenizer
from .validate import validate_checkpoint
from .writer import DEFAULT_MAX_SHARD_BYTES, write_checkpoint

# Above this, writing random weights is almost surely a mistake (the 48B preset is ~98 GB).
FORCE_ABOVE_BYTES = 10 * 1000**3


def make_checkpoint_main(argv: list[str]) -> int:
    """Run ``make-checkpoint`` with ``argv`` (without the subcommand); returns an exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: hand the code back to the caller
        return int(e.code or 0)
    try:
        config = load_preset(args.preset)
        if args.num_layers is not None:
            config = with_num_layers(config, args.num_layers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    nbytes = sum(s.nbytes() for s in expected_tensors(config).values())
    if nbytes > FORCE_ABOVE_BYTES and not args.force:
        print(
            f"error: preset {args.preset!r} with {config['num_hidden_layers']} layers means "
            f"{nbytes / 1e9:.1f} GB of random weights; pass --force to write them anyway, "
            "or --num-layers / a smaller preset (tiny, small) for tests",
            file=sys.stderr,
        )
        return 2

    out = args.out or _default_out(args.preset)
    if out is None:
        print("error: --out is required when --preset is a path", file=sys.stderr)
        return 2
    write_checkpoint(config, out, seed=args.seed, max_shard_bytes=args.max_shard_bytes)
    if not args.no_tokenizer:
        write_tokenizer(config, out)
    validate_checkpoint(out)
    print(f"wrote {out}: {config['num_hidden_layers']} layers, {nbytes / 1e6:.1f} MB of weights")
    return 0


def _default_out(preset: str) -> str | None:
    if preset not in preset_names():
        return None
    return preset if preset.startswith("kimi-linear") else f"kimi-linear-{preset}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kda-serving make-checkpoint",
        description="Write a random-weight Kimi-Linear checkpoint in the official on-disk format.",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help=f"preset name ({', '.join(preset_names())}) or path to a config.json / checkpoint dir",
    )
    p.add_argument("--out", help="output directory (default: kimi-linear-PRESET)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-layers",
        type=int,
        help="reduce/extend the stack, keeping 3 KDA : 1 MLA with the last layer MLA",
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="shard the weights above this size (default 5 GB)",
    )
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer files")
    p.add_argument("--force", action="store_true", help=f"allow writing more than {FORCE_ABOVE_BYTES // 10**9} GB")
    return p


if __name__ == "__main__":
    raise SystemExit(make_checkpoint_main(sys.argv[1:]))
