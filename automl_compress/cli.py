"""``automl-compress``: the argument parser and the dispatch to automl_compress/commands/.

Each subcommand is one module of :mod:`automl_compress.commands` (docs/architecture.md); this
module only parses the command line, resolves the config and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from automl_compress.config import Config, dump_config, load_config
from automl_compress.errors import AutoMLCompressError, ConfigError, DatabaseMismatchError


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
    p.add_argument("--db", default=None, metavar="DIR",
                   help="a shared layer database, e.g. another run's RUN/db: OUT/db links to it "
                        "(built there if missing), so the run does not solve the layers again")


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
    """The command-line parser: the subcommands and their options."""
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
    p.add_argument("--budget-bits", type=float, default=None,
                   help="average bits per weight (with --budget-range: the budget whose plan "
                        "the run writes; default the range's middle, rounded to env.budget_step)")
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
    p.add_argument("--check-dp", action="store_true",
                   help="zero-shot: score the rollout and the calibrated DP plan on the "
                        "validation split (2 evaluations) and keep the better; on another "
                        "model than the policy's, the objective and corrections are first "
                        "chosen there, as dp chooses them")
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
    """The run's config from its layered sources, each overriding the ones before.

    Defaults < YAML file < --set overrides <
    --device/--seed/--budget-bits/--budget-range/--executor/--address/--workers.
    """
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
        lo, hi = float(args.budget_range[0]), float(args.budget_range[1])
        env["budget_range"] = (lo, hi)
        if "budget_bits" not in env:
            env["budget_bits"] = cfg.env.range_middle(lo, hi)
    elif getattr(args, "command", None) == "train" and "budget_bits" not in env:
        raise ConfigError("train needs --budget-bits B (one budget) or --budget-range LOW HIGH "
                          "(one policy for every budget of the range)")
    if env:
        top["env"] = dataclasses.replace(cfg.env, **env)
    executor = {k: v for k, v in (("kind", getattr(args, "executor", None)),
                                  ("address", getattr(args, "address", None)),
                                  ("workers", getattr(args, "workers", None))) if v is not None}
    if executor:
        top["executor"] = dataclasses.replace(cfg.executor, **executor)
    return dataclasses.replace(cfg, **top) if top else cfg


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand (automl_compress/commands/); its exit code."""
    if args.command == "info":
        from automl_compress.commands import info

        return info.run()
    if args.command == "report":
        from automl_compress.commands import report

        return report.run(args.runs, args.out, args.title, tb=args.tb)
    if args.command == "evaluate":
        from automl_compress.commands import evaluate

        return evaluate.run(Path(args.run), device=args.device)
    if args.command == "export":
        from automl_compress.commands import export

        return export.run(Path(args.run), fmt=args.fmt,
                          out=Path(args.out) if args.out else None)
    cfg = resolve_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    return _dispatch_config(args, cfg, Path(args.out))


def link_database(out: Path, db: str | Path) -> bool:
    """Make ``out/db`` a link to the shared database folder ``db``; whether it made the link.

    A link, not a path in the config: every later command on the run (``evaluate``, ``export``,
    ``--resume``) finds the database where it always does.

    Raises:
        ConfigError: ``out/db`` already holds a database, or links elsewhere; ``db`` is a file,
            or a non-empty folder that is not a layer database (e.g. a run folder: its database
            is the run's ``db`` folder).
    """
    target = Path(db).resolve()
    link = out / "db"
    _check_db_folder(target)
    if link.is_symlink():
        if link.resolve() == target:
            return False
        raise ConfigError(f"{link} already links to {link.resolve()}, not to --db {target}; "
                          "use another --out, or drop --db")
    if link.exists():
        if link.resolve() == target:  # --db names the run's own folder
            return False
        raise ConfigError(f"{link} already holds a database; drop --db to reuse it, or use "
                          "another --out")
    target.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return True


def _check_db_folder(target: Path) -> None:
    """Refuse a ``--db`` that cannot be a layer database folder, before anything is written."""
    from automl_compress.database.store import BUILD_LOCK, MANIFEST

    if target.exists() and not target.is_dir():
        raise ConfigError(f"--db {target} is a file; expected a layer database folder (one "
                          "that build-db, compress or train wrote, or a new or empty folder)")
    if not target.is_dir() or (target / MANIFEST).exists():
        return
    # what a build writes (a killed one may not have written its manifest yet)
    if {p.name for p in target.iterdir()} <= {BUILD_LOCK, "layers", "objectives"}:
        return
    hint = (f"did you mean --db {target / 'db'}, the run's own database?"
            if (target / "db" / MANIFEST).exists() else "give a new or empty folder to build one")
    raise ConfigError(f"--db {target} holds files but no layer database (no {MANIFEST}); {hint}")


def _dispatch_config(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """Run a subcommand that takes a config (build-db, compress, train, apply)."""
    linked = args.db is not None and link_database(out, args.db)
    try:
        return _run_config(args, cfg, out)
    except DatabaseMismatchError as exc:
        if not linked:
            raise
        (out / "db").unlink()  # the shared folder is another setup's: leave the run as it was
        raise DatabaseMismatchError(
            f"--db {Path(args.db).resolve()} holds a layer database built for a different "
            f"setup: {'; '.join(exc.differences)}. Give --db a folder for this setup (built there "
            "if empty), or drop --db.", exc.differences) from None


def _run_config(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """The subcommand itself, its database in ``out/db``."""
    if args.command == "build-db":
        from automl_compress.commands import build_db

        return build_db.run(cfg, out)
    if args.command == "compress":
        from automl_compress.commands import compress

        return compress.run(cfg, args.method, out, evaluations=args.evaluations)
    if args.command == "train":
        from automl_compress.commands import train

        return train.run(cfg, out, total_steps=args.total_steps, resume=args.resume,
                         evaluations=args.evaluations)
    from automl_compress.commands import apply

    return apply.run(cfg, out, policy_dir=Path(args.policy), finetune_steps=args.finetune_steps,
                     evaluations=args.evaluations, check_dp=args.check_dp)


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
