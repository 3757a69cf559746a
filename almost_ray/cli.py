"""The `almost-ray` command: one subcommand per stage, each `--config FILE [--set dotted.key=value ...]`.

A stage's flags are overrides of its config section (`--input` sets the field the stage reads, `--output`
its `output_dir`), so the command line and the config name the same paths (`runs/paths.py`); the command
then calls the stage module's `run(cfg)`. Stage modules are imported only when their subcommand runs
(`COMMANDS`), so `--help` and a refused config are answered without loading torch or Ray. Bad config or
input prints one line naming the file and field, and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from almost_ray.config import Config, load_config
from almost_ray.config_base import ConfigError

# command -> the module whose `run(cfg)` it calls
COMMANDS = {
    "generate": "almost_ray.generate.stage",
    "queries": "almost_ray.synth.queries",
    "compare": "almost_ray.synth.compare",
    "train-rm": "almost_ray.train.rm",
    "eval-rm": "almost_ray.eval.rm",
    "rmsp": "almost_ray.rmsp.stage",
    "train-sft": "almost_ray.train.sft",
    "train-dpo": "almost_ray.train.dpo",
    "ppo": "almost_ray.rl.stage",
    "eval": "almost_ray.eval.evaluate",
}


def stage_module(command: str):
    """The stage module behind a command, imported now (deliberately late: see the module docstring)."""
    return importlib.import_module(COMMANDS[command])


def with_flags(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted fields set from command-line flags (None: flag not given), validated like the file."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return cfg
    data = cfg.model_dump()
    for dotted, value in given.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"command line: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _generate(args, cfg: Config) -> None:
    cfg = with_flags(cfg, {"generate.prompts": args.input, "generate.output": args.output})
    stage_module("generate").run(cfg)
    from almost_ray.runs.paths import generate_output

    print(f"wrote {generate_output(cfg)}")


def _queries(args, cfg: Config) -> None:
    queries = stage_module("queries")
    out = queries.run(with_flags(cfg, {"queries.output_dir": args.output}))
    for step, n in queries.funnel(out):
        print(f"{step:<28} {n}")
    print(f"wrote {out / 'queries.jsonl'}")


def _compare(args, cfg: Config) -> None:
    compare = stage_module("compare")
    out = compare.run(with_flags(cfg, {"compare.queries": args.queries, "compare.output_dir": args.output}))
    if args.report:
        print(compare.format_funnel(out))
    print(f"wrote {out / 'comparisons.jsonl'}")


def _train_rm(args, cfg: Config) -> None:
    out = stage_module("train-rm").run(with_flags(cfg, {"train_rm.comparisons": args.input,
                                                         "train_rm.output_dir": args.output}))
    print(f"reward model written to {out / 'model'}")


def _train_sft(args, cfg: Config) -> None:
    out = stage_module("train-sft").run(with_flags(cfg, {"train_sft.dialogues": args.input,
                                                          "train_sft.output_dir": args.output}))
    print(f"{cfg.train_sft.mode} model written to {out / 'model'}")


def _train_dpo(args, cfg: Config) -> None:
    out = stage_module("train-dpo").run(with_flags(cfg, {"train_dpo.comparisons": args.input,
                                                          "train_dpo.output_dir": args.output}))
    print(f"DPO ({cfg.train_dpo.loss_type}) model written to {out / 'model'}")


def _eval_rm(args, cfg: Config) -> None:
    out = stage_module("eval-rm").run(with_flags(cfg, {"eval_rm.inputs": args.input, "eval_rm.model": args.model,
                                                        "eval_rm.output_dir": args.output}))
    print(f"wrote {out / 'rm_accuracy.json'}")


def _eval(args, cfg: Config) -> None:
    evaluate = stage_module("eval")
    from almost_ray.eval.report import summary_lines

    cfg = with_flags(evaluate.apply_cli(cfg, args.model, args.suite, args.vs, args.reward_model),
                     {"eval.output_dir": args.output})
    report = json.loads((evaluate.run(cfg) / "report.json").read_text())
    print(f"{report['model_label']}: {', '.join(report['suites'])} in {report['wall_time_s']:.0f} s")
    for line in summary_lines(report):
        print("  " + line)


def _rmsp(args, cfg: Config) -> None:
    cfg = with_flags(cfg, {"rmsp.queries": args.queries})
    if args.compare_plain:
        from almost_ray.rmsp.vs_self_play import run_compare, summary_lines
        from almost_ray.runs.paths import rmsp_vs_self_play_dir

        print("\n".join(summary_lines(run_compare(cfg))))
        print(f"wrote {rmsp_vs_self_play_dir(cfg) / 'report.json'} and report.png")
        return
    out = stage_module("rmsp").run(cfg)
    print(f"wrote {out / 'dialogues.jsonl'} and {out / 'manifest.json'}")


def _ppo(args, cfg: Config) -> int | None:
    cfg = with_flags(cfg, {"ppo.engine": args.engine, "ppo.prompts": args.prompts})
    if cfg.ppo.engine == "openrlhf":
        from almost_ray.rl.openrlhf import launch

        return launch(cfg, dry_run=args.dry_run)
    if args.dry_run:
        raise ConfigError("ppo: --dry-run prints the OpenRLHF command; it needs --engine openrlhf")
    out = stage_module("ppo").run(cfg)
    print(f"PPO policy written to {out / 'model'}; metrics in {out / 'metrics.jsonl'}, curves in {out / 'ppo.png'}")
    return None


def _export(args, cfg: Config) -> None:
    from almost_ray.runs import paths
    from almost_ray.runs.export import export

    stage_dir = Path(args.stage_dir) if args.stage_dir else (
        paths.rmsp_plain_dir(cfg) if args.stage == "rmsp-plain" else paths.stage_dir(cfg, args.stage))
    out = export(stage_dir, args.stage, args.to, args.format)
    print(f"wrote {out} ({args.format}; load with datasets.{'load_dataset' if args.format == 'parquet' else 'load_from_disk'})")


def _serve(args, cfg: Config) -> None:
    from almost_ray.serve.app import run

    serve_cfg = cfg.serve
    if "run_dir" not in serve_cfg.model_fields_set:  # the aligned models of this config's run
        serve_cfg = serve_cfg.model_copy(update={"run_dir": cfg.run_dir})
    if args.write_gpu_config:  # the ray.serve.llm (vLLM) deploy file instead of serving here
        import yaml

        from almost_ray.data.atomic import atomic_open
        from almost_ray.serve.llm import gpu_deploy_config

        with atomic_open(args.write_gpu_config) as f:
            yaml.safe_dump(gpu_deploy_config(serve_cfg), f, sort_keys=False)
        print(f"wrote {args.write_gpu_config} (serve deploy it on a GPU cluster with vLLM installed)")
        return
    run(serve_cfg, cfg.ray)


def _pipeline(args, cfg: Config) -> None:
    from almost_ray.pipeline import loop

    extras = None if args.extras is None else [n.strip() for n in args.extras.split(",") if n.strip()]
    loop.main(args, with_flags(cfg, {"pipeline.extras": extras}))


def _plan(args: argparse.Namespace, cfg: Config) -> int:
    """Print the GPU memory plan of every stage; exit 2 when something does not fit (almost_ray/plan)."""
    from almost_ray.plan.cluster_plan import make_plan, table

    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.model_configs,
                     args.cpus_per_node, args.stage)
    print(table(plan))
    for problem in plan.problems:
        print(f"almost-ray plan: does not fit: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


DEMO_CONFIG = "configs/demo.yaml"  # `almost-ray demo` without --config, run from a checkout
OUTPUT_DIR = (("--output",), dict(help="the stage's folder (sets <section>.output_dir; default: <run dir>/<stage>)"))
# The flags of `almost-ray pipeline`, `almost-ray demo` and `jobs/rlsf.py` (besides --config and --set).
PIPELINE_ARGUMENTS: list[tuple[tuple, dict]] = [
    (("--from",), dict(dest="start", metavar="STAGE", help="start at this stage (earlier outputs must exist)")),
    (("--until",), dict(metavar="STAGE", help="stop after this stage")),
    (("--only",), dict(metavar="STAGE,...", help="run only these stages (comma-separated), in pipeline order")),
    (("--list",), dict(action="store_true", help="list the stages, whether each is done; run nothing")),
    (("--with",), dict(dest="extras", metavar="STAGE,...",
                       help="also run these optional stages in their place: train_dpo, ppo_grpo, rm_score "
                            "(sets pipeline.extras)")),
]
SOURCE = ".jsonl, Parquet, a save_to_disk folder or a hub id"

# name -> (help, handler, extra arguments)
SUBCOMMANDS: dict[str, tuple[str, Callable, list[tuple[tuple, dict]]]] = {
    "generate": (
        "answer prompts with one model through a Ray Data actor pool",
        _generate,
        [
            (("--input",), dict(required=True, help=f"prompts (sets generate.prompts): .txt (one per line), {SOURCE}")),
            (("--output",), dict(required=True, help="responses .jsonl, written atomically (sets generate.output)")),
        ],
    ),
    "train-rm": (
        "train a reward model on comparisons (Ray Train, FSDP)",
        _train_rm,
        [
            (("--input",), dict(help=f"comparisons (sets train_rm.comparisons; default: the compare stage's): {SOURCE}")),
            OUTPUT_DIR,
        ],
    ),
    "train-sft": (
        "supervised finetuning, response tuning or single-task finetuning (train_sft.mode)",
        _train_sft,
        [
            (("--input",), dict(help=f"dialogues or prompt/completion rows (sets train_sft.dialogues; default: the "
                                     f"rmsp stage's): {SOURCE}")),
            OUTPUT_DIR,
        ],
    ),
    "train-dpo": (
        "direct preference optimisation (DPO, IPO or SimPO) of the SFT model on comparisons (train_dpo.loss_type)",
        _train_dpo,
        [
            (("--input",), dict(help=f"preference pairs (sets train_dpo.comparisons; default: the compare stage's): "
                                     f"{SOURCE}")),
            OUTPUT_DIR,
        ],
    ),
    "eval-rm": (
        "pairwise accuracy of a reward model next to the prefer-longer baseline",
        _eval_rm,
        [
            (("--input",), dict(action="append", help=f"comparisons or HH-RLHF, repeatable (sets eval_rm.inputs): {SOURCE}")),
            (("--model",), dict(help="RM reference (sets eval_rm.model; default: the train_rm stage's)")),
            OUTPUT_DIR,
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
            (("--output",), dict(help="report folder (sets eval.output_dir; default: <run dir>/eval/<model>)")),
        ],
    ),
    "rmsp": (
        "reward-model-guided self-play: best-of-N assistant turns and user follow-ups (the SFT set)",
        _rmsp,
        [
            (("--queries",), dict(help=f"initial queries (sets rmsp.queries; default: the queries stage's): .txt, {SOURCE}")),
            (("--compare-plain",), dict(action="store_true",
                                        help="also run plain self-play on the same queries and report both")),
        ],
    ),
    "queries": (
        "mine initial queries with Self-Instruct on a Ray Data pool (ALMoST step 1, Appendix C.1)",
        _queries,
        [OUTPUT_DIR],
    ),
    "compare": (
        "synthetic comparisons: the generator ladder, Heuristic Filter and As-is RM filter (ALMoST step 1)",
        _compare,
        [
            (("--queries",), dict(help=f"queries (sets compare.queries; default: the queries stage's): .txt, {SOURCE}")),
            OUTPUT_DIR,
            (("--report",), dict(action="store_true", help="print the funnel table (counts and drop reasons)")),
        ],
    ),
    "export": (
        "write a stage's generated data (queries, compare, rmsp) as a Hugging Face dataset with its card",
        _export,
        [
            (("--stage",), dict(required=True, choices=["queries", "compare", "rmsp", "rmsp-plain"])),
            (("--to",), dict(required=True, help="output folder: a new one, or one an earlier export wrote")),
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
            (("--prompts",), dict(help=f"prompts (sets ppo.prompts; default: the first user turns of the rmsp stage's "
                                       f"dialogues): .txt, {SOURCE}")),
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
        PIPELINE_ARGUMENTS,
    ),
    "demo": ("the pipeline on configs/demo.yaml: `make demo` (same flags as pipeline)", _pipeline,
             PIPELINE_ARGUMENTS),
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
    from almost_ray.data.atomic import NotOursError
    from almost_ray.data.records import RecordError
    from almost_ray.models.loading import ModelRefError

    try:
        code = args.handler(args, cfg)
    except ConfigError as err:  # found while running, e.g. a data path that is not set
        print(f"almost-ray: config error:\n{err}", file=sys.stderr)
        return 2
    except (RecordError, ModelRefError, NotOursError) as err:
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
# a file-size limit, a read-only file system. Earlier outputs stay intact (data/atomic.py).
_WRITE_ERRNOS = {errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EFBIG,
                 errno.EROFS, errno.EDQUOT, errno.EISDIR}


if __name__ == "__main__":
    sys.exit(main())
