"""``automl-compress``: a thin command line over the library (docs/architecture.md)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from automl_compress.config import Config, dump_config, load_config
from automl_compress.errors import AutoMLCompressError


def _add_common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="YAML file of config overrides")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set env.budget_bits=3 (repeatable)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="where the layer solves and plan evaluations run (executor.kind; "
                        "ray needs the distributed extra, docs/distributed.md)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="executor=ray: the cluster, 'auto' or ray://HOST:10001 (executor.address;"
                        " default: start a local Ray)")
    p.add_argument("--workers", type=int, default=None,
                   help="executor=ray: evaluation actors, and CPUs of a local Ray "
                        "(executor.workers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automl-compress",
        description="Post-training compression with exact layer solvers and RL allocation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-db", help="solve every layer at every option once and cache it")
    _add_common(p)
    _add_executor(p)
    p.add_argument("--out", required=True, help="run directory")

    p = sub.add_parser("compress", help="allocate (uniform, dp, rtn) or search (evo, spdy) "
                                         "without RL and write the plan")
    _add_common(p)
    _add_executor(p)
    p.add_argument("--method", choices=("uniform", "dp", "rtn", "evo", "spdy"), required=True)
    p.add_argument("--budget-bits", type=float, required=True, help="average bits per weight")
    p.add_argument("--evaluations", type=float, default=None,
                   help="evo/spdy: validation passes to spend (default alloc.evaluations)")
    p.add_argument("--out", required=True, help="run directory")

    p = sub.add_parser("train", help="train the RL controllers and write the best plan")
    _add_common(p)
    _add_executor(p)
    p.add_argument("--budget-bits", type=float, required=True, help="average bits per weight")
    p.add_argument("--total-steps", type=int, default=None, help="environment steps")
    p.add_argument("--evaluations", type=float, default=None,
                   help="validation passes to spend (training stops when they are spent)")
    p.add_argument("--budget-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="train one policy for every budget in [LOW, HIGH] (see env.budget_step)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")

    p = sub.add_parser("apply", help="compress with a trained policy (zero-shot or fine-tuned)")
    _add_common(p)
    p.add_argument("--policy", required=True, help="run directory holding policy/")
    p.add_argument("--budget-bits", type=float, required=True, help="average bits per weight")
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--evaluations", type=float, default=None,
                   help="fine-tune until this many validation passes are spent")
    p.add_argument("--out", required=True, help="run directory")

    p = sub.add_parser("evaluate", help="re-evaluate a run's plan on the held-out split")
    p.add_argument("run", help="run directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)

    p = sub.add_parser("export", help="write the compressed model (packed integers or floats)")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--format", dest="fmt", choices=("packed", "state_dict"), default="packed",
        help="packed: RUN/compressed.safetensors, packed integers + plan (docs/export.md); "
             "state_dict: RUN/state_dict.pt, a float state dict of your own model's classes "
             "(model.load_state_dict(torch.load(path, weights_only=True)))",
    )
    p.add_argument("--out", default=None, help="output file (default: in the run directory)")

    p = sub.add_parser("report", help="an HTML report of runs: metric-vs-bits curves, allocations")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories (a folder of run directories stands for all of them)")
    p.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    p.add_argument("--tb", default=None, metavar="DIR",
                   help="also write the figures as TensorBoard images to DIR/report")
    p.add_argument("--title", default="automl-compress report")

    sub.add_parser("info", help="environment report for bug reports")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < YAML file < --set overrides < --device/--seed/--budget-bits/--budget-range/
    --executor/--address/--workers."""
    cfg = load_config(args.config, list(args.overrides))
    top: dict[str, Any] = {}
    if getattr(args, "device", None):
        top["device"] = args.device
    if getattr(args, "seed", None) is not None:
        top["seed"] = int(args.seed)
    env: dict[str, Any] = {}
    if getattr(args, "budget_bits", None) is not None:
        env["budget_bits"] = float(args.budget_bits)
    if getattr(args, "budget_range", None) is not None:
        env["budget_range"] = (float(args.budget_range[0]), float(args.budget_range[1]))
    if env:
        top["env"] = dataclasses.replace(cfg.env, **env)
    executor = {k: v for k, v in (("kind", getattr(args, "executor", None)),
                                  ("address", getattr(args, "address", None)),
                                  ("workers", getattr(args, "workers", None))) if v is not None}
    if executor:
        top["executor"] = dataclasses.replace(cfg.executor, **executor)
    return dataclasses.replace(cfg, **top) if top else cfg


def _info() -> int:
    import numpy
    import torch

    from automl_compress import __version__

    print(f"automl-compress {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print(f"numpy {numpy.__version__}")
    for mod in ("gymnasium", "stable_baselines3", "sb3_contrib", "tensorboard", "safetensors"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod} not installed")
    return 0


def _report(args: argparse.Namespace) -> int:
    from automl_compress.report import write_report

    runs = write_report(args.runs, args.out, args.title)
    methods = sorted({r.method for r in runs})
    print(f"report of {len(runs)} run(s), methods {', '.join(methods)} -> {args.out}")
    if args.tb:
        from automl_compress.logs import write_report_images

        tags = write_report_images(args.tb, runs)
        print(f"{len(tags)} TensorBoard images -> {Path(args.tb) / 'report'}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "info":
        return _info()
    if args.command == "report":
        return _report(args)
    if args.command in ("evaluate", "export"):
        from automl_compress import pipeline

        if args.command == "evaluate":
            return pipeline.run_evaluate(Path(args.run), device=args.device)
        out = Path(args.out) if args.out else None
        return pipeline.run_export(Path(args.run), fmt=args.fmt, out=out)
    cfg = resolve_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    out = Path(args.out)
    if args.command == "build-db":
        from automl_compress import pipeline

        return pipeline.run_build_db(cfg, out)
    if args.command == "compress":
        from automl_compress import pipeline

        return pipeline.run_compress(cfg, args.method, out, evaluations=args.evaluations)
    from automl_compress.agents import run as agent_run

    if args.command == "train":
        return agent_run.run_train(cfg, out, total_steps=args.total_steps, resume=args.resume,
                                   evaluations=args.evaluations)
    return agent_run.run_apply(
        cfg, out, policy_dir=Path(args.policy), finetune_steps=args.finetune_steps,
        evaluations=args.evaluations,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``automl-compress`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except AutoMLCompressError as exc:
        print(f"automl-compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            "add --resume to the same command to continue from the last checkpoint"
            if args.command == "train"
            else "re-run the same command; finished layers are kept"
        )
        print(f"automl-compress: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
