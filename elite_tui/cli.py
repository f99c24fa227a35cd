"""`elite-tui`: the wizard with no sub-command; `run`, `profile`, `plan`, `dataset`, `resume` script the same steps."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path

from elite_core.config import DEMO_MODEL, ConfigError, RunConfig, default_config
from elite_core.runner import RunLockedError
from elite_core.tiers import TIERS

TIER_NUMBERS = range(1, len(TIERS) + 1)


def _add_model_args(parser: argparse.ArgumentParser, repo: bool = True) -> None:
    parser.add_argument("--model", default=DEMO_MODEL, help="hub id, local model directory, or 'demo' (default)")
    if repo:
        parser.add_argument("--repo", default=".", help="repository to train on (default: current directory)")
    parser.add_argument("--output", default="elite-runs", help="output directory for runs (default: elite-runs)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _add_reprofile_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reprofile", action="store_true", help="measure the hardware again instead of using the cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elite-tui",
        description="Fine-tune a code LLM on a repository at the longest context your hardware holds.",
        epilog="With no sub-command the wizard opens. Every wizard step is also a sub-command.",
    )
    _add_model_args(parser)
    _add_reprofile_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train without the UI (same engine), printing progress")
    _add_model_args(run)
    run.add_argument("--config", type=Path,
                     help="a run config YAML; --model, --repo, --output, --tier, --max-steps and --set are then ignored")
    run.add_argument("--tier", type=int, choices=TIER_NUMBERS, metavar="TIER",
                     help="tier 1..7 (default: the highest that fits)")
    run.add_argument("--max-steps", type=int, help="optimizer steps (default: one epoch, or 50 on the demo)")
    run.add_argument("--run-name", help="run directory name (default: run-DATE-TIME)")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field")
    _add_reprofile_arg(run)
    run.add_argument("--preflight", choices=("auto", "on", "off"), default="auto",
                     help="the wizard's pre-flight checks before training. auto (default): all of them on a CUDA GPU, "
                          "where real probe steps confirm the largest micro-batch; on a CPU the checks without steps "
                          "(a CPU does not run out of memory, it swaps). on: the probe steps everywhere. off: none")
    launch = run.add_argument_group("several GPUs or machines")
    launch.add_argument("--gpus", type=int, metavar="N",
                        help="training processes per node: GPUs, or CPU processes on a CPU run (default 1)")
    launch.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines taking part (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's number, 0..M-1")
    launch.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every node")
    launch.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port (default 29500)")
    launch.add_argument("--hostfile", default="", help="DeepSpeed hostfile ('host slots=N' lines): node 0 starts all")
    launch.add_argument("--launcher", choices=("auto", "torchrun", "deepspeed"), default="auto",
                        help="auto: DeepSpeed's for ZeRO runs where deepspeed is installed, torchrun otherwise")
    launch.add_argument("--print-launch", action="store_true",
                        help="write the run directory's config and launch.json, print every node's command, exit")

    resume = sub.add_parser("resume", help="continue a run from its last good checkpoint")
    resume.add_argument("run_dir", type=Path)

    attach = sub.add_parser("attach", help="re-attach to a run that is still training (after an SSH drop)")
    attach.add_argument("run_dir", type=Path)
    attach.add_argument("--print", action="store_true", help="print the events instead of opening the monitor")

    profile = sub.add_parser("profile", help="print the hardware profile as JSON")
    profile.add_argument("--output", default="elite-runs", help="where the hardware profile is cached (default: elite-runs)")
    _add_reprofile_arg(profile)

    plan = sub.add_parser("plan", help="print the tier table for a model on this hardware")
    _add_model_args(plan)
    _add_reprofile_arg(plan)
    plan.add_argument("--run-dir", type=Path,
                      help="plan this run's model and time its epochs from its dataset and pre-flight probe")
    plan.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="plan with this config field changed, as the wizard's overrides do (e.g. micro_batch=2, qlora=true)")

    dataset = sub.add_parser("dataset", help="build the training set from a repository and print its summary")
    _add_model_args(dataset)
    dataset.add_argument("--preview", type=Path, metavar="FILE", help="also write the decoded training text to FILE")

    lr_find = sub.add_parser("lr-find", help="sweep the learning rate over a few real steps and suggest one")
    _add_model_args(lr_find)
    lr_find.add_argument("--tier", type=int, choices=TIER_NUMBERS, metavar="TIER",
                         help="tier 1..7 (default: the highest that fits)")
    lr_find.add_argument("--run-name", help="run directory name (default: run-DATE-TIME)")
    lr_find.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field")
    lr_find.add_argument("--steps", type=int, default=40, help="steps of the sweep (at most 40)")
    lr_find.add_argument("--min-lr", type=float, default=1e-6)
    lr_find.add_argument("--max-lr", type=float, default=1e-1)
    _add_reprofile_arg(lr_find)

    export = sub.add_parser("export", help="merge a finished run's adapter into its base model")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/merged)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command is None:
            return _wizard(args)
        handler = {"run": _run, "resume": _resume, "attach": _attach, "profile": _profile, "plan": _plan, "dataset": _dataset, "export": _export,
                   "lr-find": _lr_find}[args.command]
        return handler(args)
    except ConfigError as exc:
        print("invalid settings:", file=sys.stderr)
        for name, message in exc.errors.items():
            print(f"  {name}: {message}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"elite-tui: {exc}", file=sys.stderr)
        return 2
    except RunLockedError as exc:
        print(f"elite-tui: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a run or output directory that cannot be written (read-only, full, a file in the way)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"elite-tui: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    pass


def _wizard(args) -> int:
    from elite_tui.app import run_wizard

    config = default_config(args.model, args.repo, args.output, trust_remote_code=args.trust_remote_code)
    return run_wizard(config, reprofile=args.reprofile)


def _load_shape(model: str, trust_remote_code: bool):
    from elite_core.model_loading import ModelSourceError, load_model_shape

    try:
        return load_model_shape(model, trust_remote_code)
    except ModelSourceError as exc:
        raise CliError(str(exc)) from exc


def _profile_hardware(output: str, reprofile: bool):
    from elite_core.hardware import profile_hardware

    return profile_hardware(output, use_cache=not reprofile)


def _profile(args) -> int:
    print(json.dumps(_profile_hardware(args.output, args.reprofile).to_dict(), indent=2))
    return 0


def format_tier_table(plans, selected: int) -> str:
    from elite_core.units import format_bytes, format_coarse_duration

    header = (f"{'':2}{'tier':>4} {'context':>8} {'target':>7} {'rank':>4} {'predicted':>10} {'headroom':>10}  fits "
              f"{'tok/s':>8} {'epoch':>9}  options")
    lines = [header]
    for plan in plans:
        mark = ">" if plan.tier.number == selected else " "
        rate = f"{plan.tokens_per_s:,.0f}" if plan.rate_source else "-"
        epoch = format_coarse_duration(plan.epoch_s) if plan.rate_source and plan.tokens_per_epoch else "-"
        if plan.rate_source == "probe":
            epoch += "*"
        lines.append(
            f"{mark:2}{plan.tier.number:>4} {plan.tier.context_tokens:>8,} {plan.tier.target_tokens:>7,} "
            f"{plan.setup.lora_rank:>4} {format_bytes(plan.breakdown.total_bytes):>10} "
            f"{format_bytes(plan.headroom_bytes):>10}  {'yes' if plan.fits else 'no ':4} {rate:>8} {epoch:>9}  "
            f"{', '.join(plan.options)}"
        )
    return "\n".join(lines)


def format_tier_notes(plans) -> str:
    """The planner's notes under the table, each once with the tiers it holds for (the wizard shows them per tier)."""
    tiers_of: dict[str, list[int]] = {}
    for plan in plans:
        for note in plan.notes:
            tiers_of.setdefault(note, []).append(plan.tier.number)
    lines = [f"  tier{'s' if len(tiers) > 1 else ''} {_spans(tiers)}: {note}" for note, tiers in tiers_of.items()]
    return "\n".join(["notes:", *lines]) if lines else ""


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in spans)


def epoch_basis_line(epoch_tokens, calibration, repo: str) -> str:
    from elite_core.units import format_bytes

    if epoch_tokens.estimated:
        text = (f"epoch est.: ~{epoch_tokens.train_tokens:,} tokens from {format_bytes(epoch_tokens.source_bytes)} of "
                f"text in {repo} at {epoch_tokens.bytes_per_token:g} bytes/token")
    else:
        text = f"epoch: {epoch_tokens.train_tokens:,} tokens in the dataset"
    if calibration is None:
        return text + "; speed estimated from the measured matmul rate"
    return (text + f"; * tier {calibration.tier} measured by the pre-flight probe, other tiers calibrated from it "
                   f"(measured/estimated {calibration.ratio:.2f})")


def _plan(args) -> int:
    from elite_core.estimates import epoch_tokens_from_repo
    from elite_core.planner import CPU_MAX_STEP_S, plan_tiers, select_tier, with_epoch_times

    profile = _profile_hardware(args.output, args.reprofile)
    model, repo, trust_remote_code = args.model, args.repo, args.trust_remote_code
    run_settings = {}
    if args.run_dir is not None:
        from elite_core.probe import PROBE_FILE, ProbeResult

        if not args.run_dir.is_dir():
            raise CliError(f"run directory not found: {args.run_dir}")
        probe = ProbeResult.load(args.run_dir / PROBE_FILE)
        # The run's model and repository are what its dataset and probe measured (before training starts, the
        # run directory holds the probe but no config.yaml yet).
        if (args.run_dir / "config.yaml").is_file():
            run_config = RunConfig.load(args.run_dir / "config.yaml")
            model, repo, trust_remote_code = run_config.model, run_config.repo, run_config.trust_remote_code
            run_settings["device"] = run_config.device
        elif probe is not None:
            model = probe.model
            run_settings["device"] = probe.device
    shape = _load_shape(model, trust_remote_code)
    # On the run's device: a `device: cpu` run on a GPU machine is planned, and its probe applied, as the CPU run it is.
    config = default_config(model, repo, args.output, trust_remote_code=trust_remote_code,
                            **{**run_settings, **_parse_sets(args.set)})
    plans = plan_tiers(shape, profile, config)
    selected = select_tier(plans)
    epoch_tokens, calibration = None, None
    if args.run_dir is not None:
        epoch_tokens, calibration = _run_epoch_basis(args.run_dir, config, profile)
    if epoch_tokens is None:
        if not Path(repo).is_dir():
            raise CliError(f"repository not found: {repo}")
        epoch_tokens = epoch_tokens_from_repo(repo, config.model, config.eval_fraction)
    plans = with_epoch_times(plans, epoch_tokens, calibration)
    planned_on = profile.for_device(config.device)
    where = f"{planned_on.gpus[0].name}" if planned_on.has_gpu else "CPU (RAM)"
    slow = "" if planned_on.has_gpu else f" and, on a CPU, steps in under {CPU_MAX_STEP_S:.0f} s"
    print(f"{shape.name} on {where}; '>' marks the highest tier that fits{slow}")
    print(format_tier_table(plans, selected))
    notes = format_tier_notes(plans)
    if notes:
        print(notes)
    print(epoch_basis_line(epoch_tokens, calibration, repo))
    return 0


def _run_epoch_basis(run_dir: Path, config: RunConfig, profile):
    """The run's counted dataset tokens (None before it is built) and its probe's calibration (None without one)."""
    from elite_core.dataset import DatasetError, load_summary
    from elite_core.estimates import epoch_tokens_from_summary
    from elite_core.probe import saved_calibration

    try:
        epoch_tokens = epoch_tokens_from_summary(load_summary(run_dir / "dataset"))
    except (DatasetError, OSError):
        epoch_tokens = None
    return epoch_tokens, saved_calibration(run_dir, config, profile)


def _print_build_progress(progress) -> None:
    print(f"\r  dataset: {progress.files_done}/{progress.files_total} files, {progress.mb_per_s:.1f} MB/s",
          end="", file=sys.stderr, flush=True)


def _build_dataset(config: RunConfig):
    from elite_core.dataset import DatasetError, build_dataset

    try:
        summary = build_dataset(config.repo, config.run_dir / "dataset", tokenizer_source=config.model,
                                trust_remote_code=config.trust_remote_code, eval_fraction=config.eval_fraction,
                                seed=config.seed, progress=_print_build_progress, output_dir=config.output_dir)
    except DatasetError as exc:
        print(file=sys.stderr)  # end the progress line, so the message starts a line of its own
        raise CliError(str(exc)) from exc
    print(file=sys.stderr)
    return summary


def _dataset(args) -> int:
    from elite_core.dataset import format_summary, preview_text
    from elite_core.runs import new_run_name

    config = default_config(args.model, args.repo, args.output, trust_remote_code=args.trust_remote_code,
                            run_name=new_run_name())
    # Checked before the build, which may take minutes, so a typo in the path does not throw that work away.
    if args.preview and (args.preview.is_dir() or not args.preview.parent.is_dir()):
        problem = "is a directory" if args.preview.is_dir() else "is in a folder that does not exist"
        raise CliError(f"--preview {args.preview} {problem}")
    summary = _build_dataset(config)
    print(format_summary(summary))
    if args.preview:
        try:
            args.preview.write_text(preview_text(config.run_dir / "dataset", tokenizer_source=config.model),
                                    encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write --preview {args.preview}: {exc.strerror or exc}; the dataset itself is "
                           f"in {config.run_dir / 'dataset'}") from exc
        print(f"preview written to {args.preview}")
    return 0


def _export(args) -> int:
    from elite_core.export import ExportError, export_merged
    from elite_core.model_loading import ModelSourceError

    if not (args.run_dir / "config.yaml").is_file():
        raise CliError(f"{args.run_dir} is not a run directory (no config.yaml)")
    try:
        out_dir = export_merged(args.run_dir, args.out)
    except (ExportError, ModelSourceError) as exc:
        raise CliError(str(exc)) from exc
    print(f"merged model written to {out_dir}")
    return 0


def _parse_sets(pairs: list[str]) -> dict:
    from elite_core.config import parse_field

    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise CliError(f"--set takes FIELD=VALUE, got {pair!r}")
        name, text = pair.split("=", 1)
        values[name.strip()] = parse_field(name.strip(), text)
    return values


LAUNCH_FLAGS = {"nproc": "--gpus", "nnodes": "--nnodes", "node_rank": "--node-rank", "master_addr": "--master-addr",
                "master_port": "--master-port", "hostfile": "--hostfile", "launcher": "--launcher",
                "deepspeed": "deepspeed"}


def _check_launch_numbers(args) -> None:
    """Counts that are wrong whatever the machine: reported before the hardware is profiled or a model read."""
    if args.gpus is not None and args.gpus < 1:
        raise CliError(f"--gpus {args.gpus}: at least 1 process per node")
    if args.nnodes < 1:
        raise CliError(f"--nnodes {args.nnodes}: at least 1 node")
    if args.nnodes == 1 and args.node_rank != 0:
        raise CliError(f"--node-rank {args.node_rank}: one node (--nnodes 1) is node 0; give --nnodes for several")
    if not 0 <= args.node_rank < args.nnodes:
        raise CliError(f"--node-rank {args.node_rank}: with --nnodes {args.nnodes} the node ranks are "
                       f"0..{args.nnodes - 1} (node 0 is the machine at --master-addr)")


def _processes_per_node(args, total_gpus: int, source: str) -> int:
    """--gpus, else the total that `source` (the --config file, or --set gpus=N) gave, split over the nodes. A --set
    that disagrees with --gpus is an error; a config file's count is what --gpus is there to change."""
    if args.gpus is not None:
        if source == "--set" and total_gpus != args.gpus * args.nnodes:
            raise CliError(f"--set gpus={total_gpus} but --gpus {args.gpus} x --nnodes {args.nnodes} is "
                           f"{args.gpus * args.nnodes}: give one of them")
        return args.gpus
    if total_gpus < 1:
        raise CliError(f"gpus {total_gpus} (from {source}): at least 1")
    if total_gpus == 1:
        return 1
    if total_gpus % args.nnodes:
        raise CliError(f"gpus {total_gpus} (from {source}) does not split evenly over --nnodes {args.nnodes}: "
                       f"give --gpus per node")
    return total_gpus // args.nnodes


def _launch_for(args, config: RunConfig, profile):
    from elite_tui.engine import check_launch

    chosen = {"nproc": config.gpus // args.nnodes, "nnodes": args.nnodes, "node_rank": args.node_rank,
              "master_addr": args.master_addr, "master_port": args.master_port, "hostfile": args.hostfile,
              "launcher": args.launcher}
    settings, errors = check_launch(config, profile, **chosen)
    if errors:
        chosen["deepspeed"] = config.deepspeed
        raise CliError("; ".join(f"{LAUNCH_FLAGS[name]} {chosen[name]}: {message}" for name, message in errors.items()))
    return settings


def _print_launch(config: RunConfig, settings) -> None:
    from elite_tui.engine import launch_commands

    run_dir = config.run_dir.resolve()
    commands = launch_commands(config, settings, run_dir)
    nodes = "1 node" if settings.nnodes == 1 else f"{settings.nnodes} nodes"
    print(f"# {settings.world_size} training process{'es' if settings.world_size > 1 else ''}: {settings.nproc} per "
          f"node on {nodes}; the run directory ({run_dir}) must exist at this path on every node")
    for node, command in enumerate(commands):
        if len(commands) > 1 or settings.nnodes > 1:
            where = "starts every node from this one" if len(commands) < settings.nnodes else f"on node {node}"
            print(f"# {where}")
        print(shlex.join(command))


def _run(args) -> int:
    from elite_core.planner import plan_tiers, select_tier
    from elite_core.runs import new_run_name

    _check_launch_numbers(args)
    if args.config:
        try:
            config = RunConfig.load(args.config)
        except OSError as exc:
            raise CliError(f"cannot read {args.config}: {exc.strerror or exc}") from exc
        profile = _profile_hardware(config.output_dir, args.reprofile)
        config = config.replace(gpus=_processes_per_node(args, config.gpus, "--config") * args.nnodes,
                                nodes=args.nnodes)
        if args.run_name:  # another run of a kept config, beside the one it came from
            config = config.replace(run_name=args.run_name)
        shape = None
    else:
        config = default_config(args.model, args.repo, args.output, trust_remote_code=args.trust_remote_code,
                                run_name=args.run_name or new_run_name())
        sets = _parse_sets(args.set) if args.set else {}
        if sets.pop("nodes", args.nnodes) != args.nnodes:
            raise CliError(f"--set nodes: the nodes a run spans are --nnodes ({args.nnodes}); give --nnodes instead")
        # The tier table plans each GPU's share, so the process count is set before a tier is chosen.
        per_node = _processes_per_node(args, sets.pop("gpus"), "--set") if "gpus" in sets else args.gpus or 1
        config = config.replace(gpus=per_node * args.nnodes, nodes=args.nnodes)
        profile = _profile_hardware(args.output, args.reprofile)
        shape = _load_shape(config.model, config.trust_remote_code)
        # The tier is chosen by a plan with the overrides (as `plan --set` marks it), and they win over its defaults.
        tier = args.tier or select_tier(plan_tiers(shape, profile, config.replace(**sets)))
        config = config.with_tier(tier)
        if args.max_steps is not None:
            config = config.replace(max_steps=args.max_steps)
        if sets:
            config = config.replace(**sets)
    launch = _launch_for(args, config, profile)
    if not Path(config.repo).is_dir():
        raise CliError(f"repository not found: {config.repo}")
    if launch.node_rank == 0:  # the other nodes of a shared file system join the run node 0 started there
        _refuse_a_started_run(config.run_dir)
        from elite_core.runner import claim_run_dir

        claim_run_dir(config.run_dir)  # before the dataset is built there: a second command is refused, not mixed in
    if args.print_launch:
        from elite_core.distributed import save_launch
        from elite_core.runner import ControllerLock, prepare_run_dir

        save_launch(prepare_run_dir(config), launch)
        ControllerLock(config.run_dir).release()  # the printed commands are run by hand, after this one has exited
        _print_launch(config, launch)
        return 0
    print(f"run directory: {config.run_dir}")
    if launch.is_distributed:
        print(f"{launch.world_size} training processes ({launch.nproc} per node, node {launch.node_rank} of "
              f"{launch.nnodes})")
    summary = _build_dataset(config)
    config = _preflight(args.preflight, config, profile, summary, shape)
    from elite_tui.engine import Engine

    return _follow(Engine().start_training(config, launch=launch), other_node=launch.node_rank > 0, owns_the_run=True)


def _refuse_a_started_run(run_dir: Path) -> None:
    from elite_core.runs import started_run

    run = started_run(run_dir)
    if run is None:
        return
    if run.live:
        then = f"or follow it: elite-tui attach {run_dir}"
    elif run.resumable:
        then = f"or continue it: elite-tui resume {run_dir}"
    else:
        then = "or remove that directory"
    progress = f"step {run.step} of {run.total_steps}" if run.total_steps else f"step {run.step}"
    raise CliError(f"{run_dir} already holds a run ({run.status}, {progress}); a new run there would mix its events "
                   f"with that one's and overwrite its checkpoints: give it another --run-name, {then}")


def _preflight(mode: str, config: RunConfig, profile, summary, shape=None) -> RunConfig:
    """The wizard's pre-flight checks, one line each; the first failure stops the run with its fix, before training.
    Returns the config to train with: the probe steps' confirmed micro-batch (and the accumulation that keeps the
    tokens per update), as the wizard's Pre-flight screen hands on."""
    if mode == "off":
        from elite_core.hardware import discard_planning_profile

        discard_planning_profile(config.run_dir)  # an earlier run's in a reused directory: the child profiles afresh
        return config
    from elite_core.preflight import run_preflight

    on_gpu = profile.for_device(config.device).has_gpu
    shape = shape or _load_shape(config.model, config.trust_remote_code)
    confirmed = config
    for result in run_preflight(config, profile, summary, shape, run_step=mode == "on" or on_gpu):
        print(f"pre-flight: {result.name}: {'ok' if result.ok else 'FAILED'}: {result.message}", flush=True)
        if not result.ok:
            raise CliError(f"pre-flight check failed ({result.name}): {result.fix_hint or result.message}"
                           + "; --preflight off skips the checks")
        if result.config is not None:
            confirmed = result.config
    return confirmed


def _run_line_for(args, config: RunConfig, *extra_sets: str) -> str:
    """The `elite-tui run` line that trains what this command measured: its model, repository, output, tier and
    --set values (copied as printed, the suggestion alone trained the demo on the current directory)."""
    words = ["elite-tui", "run"]
    for flag, value, default in (("--model", args.model, DEMO_MODEL), ("--repo", args.repo, "."),
                                 ("--output", args.output, "elite-runs")):
        if value != default:
            words += [flag, str(value)]
    if args.trust_remote_code:
        words.append("--trust-remote-code")
    words += ["--tier", str(config.tier)]
    for item in [*args.set, *extra_sets]:
        words += ["--set", item]
    return shlex.join(words)


def _lr_find(args) -> int:
    from elite_core.lr_finder import LrFindFailed, LrFindRequest, describe_lr_find
    from elite_core.planner import plan_tiers, select_tier
    from elite_core.preflight import find_learning_rate
    from elite_core.runs import new_run_name

    try:
        request = LrFindRequest(steps=args.steps, min_lr=args.min_lr, max_lr=args.max_lr)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    config = default_config(args.model, args.repo, args.output, trust_remote_code=args.trust_remote_code,
                            run_name=args.run_name or new_run_name())
    profile = _profile_hardware(args.output, args.reprofile)
    shape = _load_shape(config.model, config.trust_remote_code)
    sets = _parse_sets(args.set) if args.set else {}
    config = config.with_tier(args.tier or select_tier(plan_tiers(shape, profile, config.replace(**sets))))
    if sets:
        config = config.replace(**sets)
    if not Path(config.repo).is_dir():
        raise CliError(f"repository not found: {config.repo}")
    _refuse_a_started_run(config.run_dir)  # its dataset would be rebuilt under it from this repository
    _build_dataset(config)
    try:
        result = find_learning_rate(config, request)
    except LrFindFailed as exc:
        raise CliError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from exc
    print(describe_lr_find(result))
    print(f"use it: {_run_line_for(args, config, f'learning_rate={result.suggested_lr:.3g}')}  "
          f"(kept in {config.run_dir}/lr_find.json)")
    return 0


def _resume(args) -> int:
    run_dir = args.run_dir.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise CliError(f"{args.run_dir} is not a run directory (no config.yaml)")
    from elite_core.runs import run_info

    info = run_info(run_dir)
    if info.status == "finished":
        # Resumed, it loaded the model to write the same final checkpoint and report again.
        raise CliError(f"{args.run_dir} finished at step {info.step}: nothing to resume (its report: "
                       f"{run_dir / 'report.md'})")
    # The run directory may have moved, or this shell may stand elsewhere: it is where the run is.
    config = RunConfig.load(run_dir / "config.yaml").replace(output_dir=str(run_dir.parent), run_name=run_dir.name)
    from elite_core.distributed import read_launch
    from elite_tui.engine import Engine

    # Relaunched as RUN_DIR/launch.json says (one process, or the same GPUs and nodes as before).
    return _follow(Engine().start_training(config, resume=True), other_node=read_launch(run_dir).node_rank > 0,
                   owns_the_run=True)


def _attach(args) -> int:
    from elite_core.runner import AttachedRun, live_child_pid

    run_dir = args.run_dir
    if not (run_dir / "config.yaml").is_file():
        raise CliError(f"{run_dir} is not a run directory (no config.yaml)")
    if live_child_pid(run_dir) is None:
        from elite_core.runs import run_info

        info = run_info(run_dir)
        if info.status == "finished":
            raise CliError(f"nothing is training in {run_dir}: it finished at step {info.step}")
        raise CliError(f"nothing is training in {run_dir}: continue it with `elite-tui resume {run_dir}`")
    if args.print:
        return _follow(AttachedRun(run_dir))
    from elite_tui.app import EliteApp
    from elite_tui.state import WizardState

    config = RunConfig.load(run_dir / "config.yaml")
    app = EliteApp(config, start_at="monitor", state=WizardState(config=config, attach=True))
    result = app.run()
    return result if isinstance(result, int) else (app.return_code or 0)


def _follow(process, other_node: bool = False, owns_the_run: bool = False) -> int:
    """Print the child's events; the first Ctrl+C asks for a checkpoint and a clean stop, a second one kills.

    The command that started the run (`run`, `resume`) passes a SIGTERM on as that stop: `timeout`, a scheduler's
    time limit or a plain `kill` mean the run should end, with its checkpoint, not go on detached holding the GPU
    (the training child has its own session, so the signal reaches only this process). An SSH drop's SIGHUP still
    leaves it training, and `attach --print`, which only looks on, lets it train on when it is ended.

    On a node other than 0 no rank reports progress (rank 0 is on node 0): its pipe carries only a failure of its own
    ranks, and a launcher that exits with code 0 without a word has done its part."""
    from elite_core import protocol

    interrupts = 0

    def on_interrupt(*_):
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nstopping: writing a checkpoint first (Ctrl+C again to kill)", file=sys.stderr)
            process.stop()
        else:
            process.kill()

    def on_terminate(*_):
        print("\nstopping (SIGTERM): writing a checkpoint first", file=sys.stderr)
        process.stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    previous_term = signal.signal(signal.SIGTERM, on_terminate) if owns_the_run else None
    code = 1
    try:
        for event in process.events():
            if isinstance(event, protocol.Started):
                print(f"training on {event.device}: {event.total_steps} steps of {event.tokens_per_step:,} tokens, "
                      f"{event.trainable_params:,} trainable parameters")
            elif isinstance(event, protocol.StepMetrics):
                print(f"step {event.step:>6}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                      f"{event.tokens_per_s:,.0f} tok/s  mem {event.memory_bytes / 2**30:.2f} GiB", flush=True)
            elif isinstance(event, protocol.EvalMetrics):
                print(f"eval at step {event.step}: loss {event.loss:.4f}, perplexity {event.perplexity:.2f}")
            elif isinstance(event, protocol.CheckpointSaved):
                print(f"checkpoint ({event.reason}) at step {event.step}: {event.path}")
            elif isinstance(event, protocol.Warning):
                print(f"warning: {event.message}", file=sys.stderr)
            elif isinstance(event, protocol.Error) and other_node and event.kind == "crash" and process.returncode == 0:
                print("this node's training processes finished; node 0 has the run's results")
                code = 0
            elif isinstance(event, protocol.Error):
                print(f"error: {event.message}", file=sys.stderr)
                if event.traceback:
                    print(event.traceback, file=sys.stderr)
                code = 1
            elif isinstance(event, protocol.Finished):
                state = "stopped" if event.stopped_early else "finished"
                print(f"{state} at step {event.step}, final loss {event.final_loss:.4f}")
                if event.adapter_path:
                    print(f"adapter: {event.adapter_path}")
                if event.report_path:
                    print(f"report: {event.report_path}")
                if getattr(process, "run_dir", None) is not None and not other_node:
                    run_dir = shlex.quote(str(process.run_dir))
                    print(f"continue it: elite-tui resume {run_dir}" if event.stopped_early
                          else f"merge the adapter into the base model: elite-tui export {run_dir}")
                code = 0
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return code


if __name__ == "__main__":
    sys.exit(main())
