"""The `almost-ray` command: one subcommand per stage, each `--config FILE [--set dotted.key=value ...]`.

Stage modules are imported only when their subcommand runs, so `--help` is instant. Bad config or
input prints one clear error naming the file and field, and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from almost_ray.config import Config, ConfigError, load_config


def _generate(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray import generate

    out = generate.run(cfg.generate, cfg.ray, args.input, args.output)
    print(f"wrote {out}")


def _demo(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray import demo

    demo.run(cfg)


# name -> (help, handler, extra arguments)
SUBCOMMANDS: dict[str, tuple[str, Callable, list[tuple[tuple, dict]]]] = {
    "generate": (
        "answer prompts with one model through a Ray Data actor pool",
        _generate,
        [
            (("--input",), dict(required=True, help="prompts: .txt (one per line) or .jsonl")),
            (("--output",), dict(required=True, help="responses .jsonl, written atomically")),
        ],
    ),
    "demo": ("run the pipeline, as far as it is built, on a local Ray with the embedded model", _demo, []),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="almost-ray", description="Align a language model with synthetic feedback (ALMoST) on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (help_text, handler, extra) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", help="YAML config (defaults when omitted)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field, e.g. --set generate.sampling.temperature=0 (repeatable)",
        )
        for flags, kwargs in extra:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"almost-ray: config error:\n{err}", file=sys.stderr)
        return 2
    from almost_ray.models.loading import ModelRefError
    from almost_ray.records import RecordError

    try:
        args.handler(args, cfg)
    except (RecordError, ModelRefError) as err:
        print(f"almost-ray: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
