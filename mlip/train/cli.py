"""`mlip train`: fit a potential from a YAML config, or resume a run."""


def register(commands) -> None:
    from ..cli import NON_NEGATIVE_INT, POSITIVE

    p = commands.add_parser("train", help="train a potential from a YAML config (or resume a run)",
                            description="Train from CONFIG (see md_examples/configs/train_allegro_small.yaml), "
                                        "or continue the run in RUN_DIR exactly where its last.pt stopped.")
    p.add_argument("config", nargs="?", help="YAML training config")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run (its config and data are reused)")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="fine-tune: start from these weights (a checkpoint, "
                   "run directory or deployed model file); overrides init_from in the config")
    p.add_argument("--max-epochs", type=NON_NEGATIVE_INT, help="override stop.max_epochs")
    p.add_argument("--max-minutes", type=POSITIVE, help="override stop.max_minutes (the run's total wall clock)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    import os

    from ..files import check_input, check_structure_files
    from .config import load_config
    from .trainer import resume, train

    if bool(args.config) == bool(args.resume):
        raise ValueError("give either a CONFIG file or --resume RUN_DIR")
    if args.resume:
        if args.init_from or args.run_dir:
            raise ValueError("--resume continues a run as it was: --init-from/--run-dir do not apply")
        if not os.path.isdir(args.resume):
            raise NotADirectoryError(f"--resume {args.resume!r} is not a run directory")
        result = resume(args.resume, max_epochs=args.max_epochs, max_minutes=args.max_minutes,
                        progress=False if args.no_progress else None)
    else:
        check_input(args.config, "config file")
        config = load_config(args.config)
        if args.init_from:
            if not os.path.exists(args.init_from):
                raise FileNotFoundError(f"--init-from {args.init_from!r}: no such file or run directory")
            config.init_from = os.path.abspath(args.init_from)
        if args.run_dir:
            config.run_dir = os.path.abspath(args.run_dir)
        if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
            raise NotADirectoryError(f"run_dir {config.run_dir!r} exists and is not a directory")
        check_structure_files(config.data.train, "data.train file")
        check_structure_files(config.data.validation, "data.validation file")
        if args.max_epochs is not None:
            config.stop.max_epochs = args.max_epochs
        if args.max_minutes is not None:
            config.stop.max_minutes = args.max_minutes
        if args.no_progress:
            config.progress = False
        result = train(config)
    print(f"stopped ({result.stop_reason}) after {result.epochs} epochs, {result.steps} steps, "
          f"{result.elapsed_s:.0f} s; best validation {result.monitor} {result.best_metric:.4g} at epoch {result.best_epoch}; "
          f"checkpoints in {result.run_dir}")
    return 0
