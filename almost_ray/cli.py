"""The `almost-ray` command: one subcommand per stage, each `--config FILE [--set dotted.key=value ...]`.

Stage modules are imported only when their subcommand runs, so `--help` is instant. Bad config or
input prints one clear error naming the file and field, and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path

from almost_ray import pipeline
from almost_ray.config import Config, load_config
from almost_ray.config_base import ConfigError


def _generate(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray import generate

    out = generate.run(cfg.generate, cfg.ray, args.input, args.output)
    print(f"wrote {out}")


def _queries(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.synth import queries

    out = queries.run(cfg.queries, cfg.ray, args.output or cfg.run_dir / "queries")
    for step, n in queries.funnel(out.parent):
        print(f"{step:<28} {n}")
    print(f"wrote {out}")


def _compare(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.synth import compare

    stage_dir = Path(args.output or cfg.run_dir / "compare")
    source = args.queries or cfg.compare.queries or cfg.run_dir / "queries" / "queries.jsonl"
    out = compare.run(cfg.compare, cfg.ray, source, stage_dir)
    if args.report:
        print(compare.format_funnel(stage_dir))
    print(f"wrote {out}")


def _pipeline(args: argparse.Namespace, cfg: Config) -> None:
    pipeline.main(args, cfg)


def _train_rm(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.train import reward

    out = reward.run(cfg.train_rm, cfg.ray, args.input, args.output or cfg.run_dir / "rm")
    print(f"reward model written to {out}")


def _train_sft(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.train import sft

    out = sft.run(cfg.train_sft, cfg.ray, args.input, args.output or cfg.run_dir / cfg.train_sft.mode)
    print(f"{cfg.train_sft.mode} model written to {out}")


def _eval_rm(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.eval import rm_accuracy

    model = args.model or cfg.eval_rm.model or str(cfg.run_dir / "rm" / "model")
    output = args.output or cfg.run_dir / "eval_rm" / "rm_accuracy.json"
    rm_accuracy.run(model, args.input, cfg.eval_rm, cfg.ray, output)
    print(f"wrote {output}")


def _eval(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.eval.report import summary_lines
    from almost_ray.eval.run import apply_cli, run

    cfg = apply_cli(cfg, args.model, args.suite, args.vs, args.reward_model)
    report = run(cfg, args.output)
    print(f"{report['model_label']}: {', '.join(report['suites'])} in {report['wall_time_s']:.0f} s")
    for line in summary_lines(report):
        print("  " + line)


def _rmsp(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.rmsp import stage

    if args.compare_plain:
        from almost_ray.rmsp.compare import COMPARE_DIR, run_compare, summary_lines

        report = run_compare(cfg.rmsp, cfg.ray, cfg.run_dir, args.queries)
        print("\n".join(summary_lines(report)))
        print(f"wrote {cfg.run_dir / COMPARE_DIR / 'report.json'} and report.png")
        return
    out = stage.run(cfg.rmsp, cfg.ray, cfg.run_dir, args.queries)
    print(f"wrote {out / 'dialogues.jsonl'} and {out / 'manifest.json'}")


def _export(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.export import export

    stage_dir = Path(args.stage_dir) if args.stage_dir else cfg.run_dir / args.stage
    out = export(stage_dir, args.stage, args.to, args.format)
    print(f"wrote {out} ({args.format}; load with datasets.{'load_dataset' if args.format == 'parquet' else 'load_from_disk'})")


def _serve(args: argparse.Namespace, cfg: Config) -> None:
    from almost_ray.serve.app import run

    serve_cfg = cfg.serve
    if "run_dir" not in serve_cfg.model_fields_set:  # the aligned models of this config's run
        serve_cfg = serve_cfg.model_copy(update={"run_dir": cfg.run_dir})
    if args.write_gpu_config:  # the ray.serve.llm (vLLM) deploy file instead of serving here
        import yaml

        from almost_ray.records import atomic_open
        from almost_ray.serve.llm import gpu_deploy_config

        with atomic_open(args.write_gpu_config) as f:
            yaml.safe_dump(gpu_deploy_config(serve_cfg), f, sort_keys=False)
        print(f"wrote {args.write_gpu_config} (serve deploy it on a GPU cluster with vLLM installed)")
        return
    run(serve_cfg, cfg.ray)


def _ppo(args: argparse.Namespace, cfg: Config) -> int | None:
    section = cfg.ppo.model_copy(update={"engine": args.engine}) if args.engine else cfg.ppo
    if section.engine == "openrlhf":
        from almost_ray.rl.openrlhf import launch

        return launch(cfg.model_copy(update={"ppo": section}), dry_run=args.dry_run, prompts=args.prompts)
    if args.dry_run:
        raise ConfigError("ppo: --dry-run prints the OpenRLHF command; it needs --engine openrlhf")
    from almost_ray.rl import stage

    out = stage.run(section, cfg.ray, cfg.run_dir, args.prompts)
    print(f"PPO policy written to {out / 'model'}; metrics in {out / 'metrics.jsonl'}, curves in {out / 'ppo.png'}")
    return None


def _plan(args: argparse.Namespace, cfg: Config) -> int:
    """Print the GPU memory plan of every stage; exit 2 when something does not fit (almost_ray/plan)."""
    from almost_ray.plan import make_plan, table

    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.model_configs,
                     args.cpus_per_node, args.stage)
    print(table(plan))
    for problem in plan.problems:
        print(f"almost-ray plan: does not fit: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


DEMO_CONFIG = "configs/demo.yaml"  # `almost-ray demo` without --config, run from a checkout

# name -> (help, handler, extra arguments)
SUBCOMMANDS: dict[str, tuple[str, Callable, list[tuple[tuple, dict]]]] = {
    "generate": (
        "answer prompts with one model through a Ray Data actor pool",
        _generate,
        [
            (("--input",), dict(required=True, help="prompts: .txt (one per line), .jsonl, Parquet, a save_to_disk dir or a hub id")),
            (("--output",), dict(required=True, help="responses .jsonl, written atomically")),
        ],
    ),
    "train-rm": (
        "train a reward model on comparisons (Ray Train, FSDP)",
        _train_rm,
        [
            (("--input",), dict(required=True, help="comparisons (prompt/chosen/rejected or HH-RLHF): .jsonl, Parquet, save_to_disk dir or hub id")),
            (("--output",), dict(help="stage directory (default: <run dir>/rm); the model goes to <output>/model")),
        ],
    ),
    "train-sft": (
        "supervised finetuning, response tuning or single-task finetuning (train_sft.mode)",
        _train_sft,
        [
            (("--input",), dict(required=True, help="dialogues (messages, or prompt/completion): .jsonl, Parquet, save_to_disk dir or hub id")),
            (("--output",), dict(help="stage directory (default: <run dir>/<mode>)")),
        ],
    ),
    "eval-rm": (
        "pairwise accuracy of a reward model next to the prefer-longer baseline",
        _eval_rm,
        [
            (("--input",), dict(required=True, action="append", help="comparisons or HH-RLHF: .jsonl, Parquet, save_to_disk dir or hub id (repeatable)")),
            (("--model",), dict(help="RM reference (default: eval_rm.model, else <run dir>/rm/model)")),
            (("--output",), dict(help="JSON report (default: <run dir>/eval_rm/rm_accuracy.json)")),
        ],
    ),
    "eval": (
        "Static HHH, TruthfulQA MC1, response ranking and pairwise judging of a model; report + plots",
        _eval,
        [
            (("--model",), dict(help="model reference (default: eval.model.ref)")),
            (("--suite",), dict(help="comma-separated: hhh,truthfulqa,ranking,judge (default: eval.suites)")),
            (("--vs",), dict(help="the second model of pairwise judging (sets eval.vs.ref)")),
            (("--reward-model",), dict(action="store_true", help="--model is a reward model (eval.kind=reward)")),
            (("--output",), dict(help="report directory (default: <run dir>/eval/<model>)")),
        ],
    ),
    "rmsp": (
        "reward-model-guided self-play: best-of-N assistant turns and user follow-ups (the SFT set)",
        _rmsp,
        [
            (("--queries",), dict(help="initial queries .jsonl/.txt (default: rmsp.queries, else step 1's output)")),
            (("--compare-plain",), dict(action="store_true",
                                        help="also run plain self-play on the same queries and report both")),
        ],
    ),
    "queries": (
        "mine initial queries with Self-Instruct on a Ray Data pool (ALMoST step 1, Appendix C.1)",
        _queries,
        [(("--output",), dict(help="stage directory (default: <run dir>/queries)"))],
    ),
    "compare": (
        "synthetic comparisons: the generator ladder, Heuristic Filter and As-is RM filter (ALMoST step 1)",
        _compare,
        [
            (("--queries",), dict(help="queries .jsonl/.txt (default: compare.queries, else <run dir>/queries)")),
            (("--output",), dict(help="stage directory (default: <run dir>/compare)")),
            (("--report",), dict(action="store_true", help="print the funnel table (counts and drop reasons)")),
        ],
    ),
    "export": (
        "write a stage's generated data (queries, compare, rmsp) as a Hugging Face dataset with its card",
        _export,
        [
            (("--stage",), dict(required=True, choices=["queries", "compare", "rmsp", "rmsp-plain"])),
            (("--to",), dict(required=True, help="output folder (replaced)")),
            (("--format",), dict(default="parquet", choices=["parquet", "disk"],
                                 help="parquet: load_dataset(DIR); disk: Dataset.save_to_disk")),
            (("--stage-dir",), dict(help="the stage's folder (default: <run dir>/<stage>)")),
        ],
    ),
    "serve": (
        "serve the aligned model and the RM over HTTP (OpenAI-compatible, Ray Serve) until Ctrl-C",
        _serve,
        [(("--write-gpu-config",), dict(metavar="PATH", help="write the ray.serve.llm (vLLM) deploy file and exit"))],
    ),
    "ppo": (
        "PPO of the SFT policy against the synthetic RM with a KL penalty (ALMoST step 3, RLSF)",
        _ppo,
        [
            (("--prompts",), dict(help="prompts .jsonl/.txt (default: ppo.prompts, else first user turns of "
                                        "<run dir>/rmsp/dialogues.jsonl)")),
            (("--engine",), dict(choices=["almost_ray", "openrlhf"], help="overrides ppo.engine")),
            (("--dry-run",), dict(action="store_true", help="with --engine openrlhf: print the command, run nothing")),
        ],
    ),
    "plan": (
        "GPU memory plan: each stage's pools, roles, engines and workers on N nodes x G GPUs of M GiB; exit 2 if any does not fit",
        _plan,
        [
            (("--nodes",), dict(type=int, required=True, help="GPU nodes")),
            (("--gpus-per-node",), dict(type=int, required=True)),
            (("--gpu-memory-gb",), dict(type=float, required=True, help="GiB of one GPU (80 for an A100/H100 80GB)")),
            (("--cpus-per-node",), dict(type=float, help="also check CPUs (default: not checked)")),
            (("--model-configs",), dict(type=Path, help="folder of <name>/config.json for model paths absent here "
                                                        "(e.g. configs/model-shapes)")),
            (("--stage",), dict(action="append", help="only this stage (repeatable)")),
        ],
    ),
    "pipeline": (
        "the whole pipeline, queries to report, each stage skipped when done (see --list)",
        _pipeline,
        pipeline.ARGUMENTS,
    ),
    "demo": ("the pipeline on configs/demo.yaml: `make demo` (same flags as pipeline)", _pipeline,
             pipeline.ARGUMENTS),
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
    if args.command == "demo" and args.config is None:
        args.config = DEMO_CONFIG
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"almost-ray: config error:\n{err}", file=sys.stderr)
        return 2
    from almost_ray.models.loading import ModelRefError
    from almost_ray.records import RecordError

    try:
        code = args.handler(args, cfg)
    except ConfigError as err:  # found while running, e.g. a data path that is not set
        print(f"almost-ray: config error:\n{err}", file=sys.stderr)
        return 2
    except (RecordError, ModelRefError) as err:
        print(f"almost-ray: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not about a path (e.g. Ray's ConnectionError): keep the traceback
            raise
        verb = "cannot write" if err.errno in _WRITE_ERRNOS else "cannot access"
        print(f"almost-ray: error: {verb} {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


# An output that cannot be written: a file where a folder should be, no permission, a full disk or
# a file-size limit, a read-only file system. Earlier outputs stay intact (records.atomic_open).
_WRITE_ERRNOS = {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EFBIG,
                 errno.EROFS, errno.EDQUOT, errno.EISDIR}


if __name__ == "__main__":
    sys.exit(main())
