"""`mlip train`: fit a potential from a YAML config, or resume a run."""


def register(commands) -> None:
    from ..cli import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT

    p = commands.add_parser("train", help="train a potential from a YAML config (or resume a run)",
                            description="Train from CONFIG (see md_examples/configs/train_allegro_small.yaml), "
                                        "or continue the run in RUN_DIR exactly where its last.pt stopped. A CONFIG "
                                        "with `stages:` trains its stages in order, each from the one before's best "
                                        "weights (RUN_DIR/stage_K, the last in RUN_DIR); run again, it continues.")
    p.add_argument("config", nargs="?", help="YAML training config")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run (its config and data are reused)")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="fine-tune: start from these weights (a checkpoint, "
                   "run directory or deployed model file); overrides init_from in the config")
    p.add_argument("--max-epochs", type=NON_NEGATIVE_INT, help="override stop.max_epochs")
    p.add_argument("--max-minutes", type=POSITIVE, help="override stop.max_minutes (the run's total wall clock)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--nproc", type=POSITIVE_INT, metavar="N", help="train data-parallel in N processes on this machine "
                   "(started by torchrun; batch_size is the global batch; device: cuda gives each its own GPU)")
    p.set_defaults(run=run_train)

    p = commands.add_parser("cv", help="cross-validate a property model over given folds (Matbench protocol)",
                            description="Train CONFIG (task: property) from scratch on each fold's training "
                                        "structures and score its test structures once; see mlip.train.cv.")
    p.add_argument("config", help="YAML training config; data.train holds all structures")
    p.add_argument("--folds", required=True, metavar="FOLDS.json", help="the folds (e.g. Matbench's "
                   "matbench_v0.1_folds.json): {fold_K: {train: [...], test: [...]}} at any depth")
    p.add_argument("--id-key", metavar="KEY", help="match fold entries against atoms.info[KEY] (e.g. mbid); "
                   "without it they are structure indices")
    p.add_argument("--fold", action="append", metavar="NAME", help="run only this fold (repeatable)")
    p.add_argument("--run-dir", help="override run_dir (each fold trains in RUN_DIR/fold_K)")
    p.add_argument("--members", type=POSITIVE_INT, default=1, metavar="K", help="train K models per fold (seeds "
                   "seed, seed+1, ...) and score the mean of their predictions, beside each one's own scores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=run_cv)


def run_train(args) -> int:
    import os

    from ..files import check_input, check_structure_files
    from .config import load_stages
    from .trainer import resume, train_stages

    if bool(args.config) == bool(args.resume):
        raise ValueError("give either a CONFIG file or --resume RUN_DIR")
    if args.nproc is not None and args.nproc > 1:
        return launch(args)
    if args.resume:
        if args.init_from or args.run_dir:
            raise ValueError("--resume continues a run as it was: --init-from/--run-dir do not apply")
        if not os.path.isdir(args.resume):
            raise NotADirectoryError(f"--resume {args.resume!r} is not a run directory")
        results = [resume(args.resume, max_epochs=args.max_epochs, max_minutes=args.max_minutes,
                          progress=False if args.no_progress else None)]
    else:
        check_input(args.config, "config file")
        stages = load_stages(args.config, run_dir=os.path.abspath(args.run_dir) if args.run_dir else None)
        config = stages[0]
        if len(stages) > 1 and (args.max_epochs is not None or args.max_minutes is not None):
            raise ValueError(f"{args.config} has {len(stages)} stages: --max-epochs/--max-minutes would not say "
                             "which; set stop in the stages")
        if args.init_from:
            if not os.path.exists(args.init_from):
                raise FileNotFoundError(f"--init-from {args.init_from!r}: no such file or run directory")
            config.init_from = os.path.abspath(args.init_from)
        if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
            raise NotADirectoryError(f"run_dir {config.run_dir!r} exists and is not a directory")
        check_structure_files(config.data.train, "data.train file")
        check_structure_files(config.data.validation, "data.validation file")
        if args.max_epochs is not None:
            config.stop.max_epochs = args.max_epochs
        if args.max_minutes is not None:
            config.stop.max_minutes = args.max_minutes
        for stage in stages:
            stage.progress = stage.progress and not args.no_progress
        results = train_stages(stages)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports
    for k, result in enumerate(results, start=1):
        stage = f"stage {k} of {len(results)}: " if len(results) > 1 else ""
        print(f"{stage}stopped ({result.stop_reason}) after {result.epochs} epochs, {result.steps} steps, "
              f"{result.elapsed_s:.0f} s; best validation {result.monitor} {result.best_metric:.4g} at epoch "
              f"{result.best_epoch}; checkpoints in {result.run_dir}")
    return 0


def run_cv(args) -> int:
    import os

    from ..files import check_input, check_structure_files
    from .config import load_stages
    from .cv import cross_validate

    check_input(args.config, "config file")
    check_input(args.folds, "folds file")
    stages = load_stages(args.config)
    if len(stages) > 1:
        raise ValueError(f"{args.config}: mlip cv trains one stage per fold; this config has {len(stages)} stages")
    config = stages[0]
    check_structure_files(config.data.train, "data.train file")
    if args.run_dir:
        config.run_dir = os.path.abspath(args.run_dir)
    if args.no_progress:
        config.progress = False
    cross_validate(config, args.folds, args.id_key, args.fold, args.members)
    return 0


def launch(args) -> int:
    """This command again in ``--nproc`` processes, started by torchrun's own launcher
    (torch.distributed.run) on this machine; several machines: run torchrun yourself (README)."""
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .config import load_config

    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise ValueError("--nproc inside a torchrun job: torchrun already started the processes")
    if args.config and load_config(args.config).batch_size < args.nproc:  # refused before anything starts
        raise ValueError(f"{args.config}: batch_size {load_config(args.config).batch_size} is smaller than --nproc "
                         f"{args.nproc}: batch_size is the global batch, shared among the processes")
    command = ["train", os.path.abspath(args.config)] if args.config else ["train", "--resume",
                                                                           os.path.abspath(args.resume)]
    for flag, value in (("--init-from", args.init_from), ("--max-epochs", args.max_epochs),
                        ("--max-minutes", args.max_minutes), ("--run-dir", args.run_dir)):
        if value is not None:
            command += [flag, os.path.abspath(value) if flag in ("--init-from", "--run-dir") else str(value)]
    if args.no_progress:
        command.append("--no-progress")
    launcher = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(args.nproc),
                                             "-m", "mlip", *command])
    try:
        run(launcher)
    except ChildFailedError as error:  # each process printed its own error above
        rank, failure = error.get_first_failure()
        raise RuntimeError(f"the training process of rank {rank} (of {args.nproc}) failed first, with exit code "
                           f"{failure.exitcode}; torchrun stopped the others") from None
    return 0
