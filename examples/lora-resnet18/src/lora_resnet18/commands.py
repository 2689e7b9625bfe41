"""What each command does, once cli.py has parsed its arguments.

`run` loads the config and calls the command; an error in the user's input is
one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, read_classes, read_state_dict, verify_in_run
from .config import DEFAULT_DATA, Config, ConfigError, given_keys, load_config
from .data import (
    DataError,
    class_names,
    count_classes_from,
    data_record,
    make_datasets,
    numbered_classes,
    preprocessing_record,
    same_data,
    saved_split,
)
from .evaluation import confusion_matrix, finite_or_null, report, table, write_report
from .freeze import FreezeSpecError
from .integrity import IntegrityError
from .layers import format_layer_table, layer_table, parse_spec, spec_report
from .lora import attach, merged_checkpoint
from .lr_find import COLUMNS, check_request, lr_find, schedule_factor, suggest
from .model import PretrainedWeightsError, build_model
from .predict import format_rows, image_files, predict, predict_workers, write_predictions
from .rng import rngs_kept, seed_everything
from .run import pick_device, prepare_model
from .runfolder import check_destination
from .saving import DivergedError, write_csv
from .train import Stopped, fit
from .weights import inspect_weights, plan_load

# Errors that mean "your input is wrong": printed as one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    FreezeSpecError,
    DivergedError,
    IntegrityError,
    PretrainedWeightsError,
)


def cmd_layers(args: argparse.Namespace, config: Config) -> int:
    if args.spec:
        # A dry run on the plain model: only what the selectors match, nothing applied.
        # With the adapters: the names keep_trainable, stages and bn_modes see (peft's base_layer, lora_A).
        model = build_model(config)
        attach(model, config.lora)
        print(spec_report(model, parse_spec(args.spec)))
        return 0
    try:
        model, _ = prepare_model(config)
        problem = None
    except USER_ERRORS as err:
        # Show the table anyway: it is what the user needs to fix the spec.
        model, problem = build_model(config), err
    table = layer_table(model)
    print(json.dumps(table, indent=2) if args.json else format_layer_table(table))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_train(args: argparse.Namespace, config: Config) -> int:
    # A resume trains on with the config its checkpoint saved; a --config or
    # --set given now is checked against it.
    resumed_config = None if args.resume is not None and args.config is None else config
    options = {
        "data": args.data,
        "epochs": args.epochs,
        "init": args.init,
        "resume": args.resume,
        "overrides": args.set,
        "stop_after": args.stop_after,
        "device": args.device,
        "freeze_from": args.freeze_from,
        "overwrite": args.overwrite,
        # The folder's class count decides unless the user gave one (README "Data").
        "count_classes": "model.num_classes" not in given_keys(args.config, args.set),
    }
    with signals_unwind() as received:
        try:
            fit(resumed_config, args.out, **options)
        except KeyboardInterrupt as err:
            line = str(err) if isinstance(err, Stopped) else "stopped before training began; nothing was written"
            print(line, file=sys.stderr)
            # The shell's codes for a death by the signal: 130 for Ctrl-C, 143 for SIGTERM.
            return 128 + (received[-1] if received else signal.SIGINT)
    return 0


@contextlib.contextmanager
def signals_unwind() -> Iterator[list[int]]:
    """SIGTERM (a job scheduler's stop) unwinds like Ctrl-C, so no save is left half-written.

    Yields the signals received; the previous handlers come back afterwards.
    """
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_lr_find(args: argparse.Namespace, config: Config) -> int:
    if "model.num_classes" not in given_keys(args.config, args.set):
        count_classes_from(args.data, config)  # as train counts them: the head and groups train would have
    out, sweep_range = Path(args.out), (args.start, args.end, args.steps)
    check_request(out, sweep_range, args.stage, config, args.overwrite)
    device = pick_device(args.device)
    with rngs_kept():
        seed_everything(config.train.seed)  # the model train starts from: a new head's draw included
        model, state = prepare_model(
            config,
            init=args.init,
            pretrained=config.model.pretrained and args.init is None,
            freeze_from=args.freeze_from,
        )
    train_set, _ = make_datasets(args.data, config)
    test = lr_find(model, state, config, train_set, device, args.stage, sweep_range)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv(out / "lr_find.csv", COLUMNS, test.rows)]
    suggestion, why = suggest(test.rows)
    tensors = sum(len(group["params"]) for group in test.groups)
    print(f"lr-find at stage {args.stage}: {len(test.rows)} steps, {len(test.groups)} groups of {tensors} tensors")
    print(f"stopped: {test.stopped}")
    if suggestion is None:
        print(f"no suggestion: {why}")
    else:
        print(suggestion_lines(args, config, suggestion))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def suggestion_lines(args: argparse.Namespace, config: Config, suggestion: float) -> str:
    """The suggested train.lr, and the train command that uses it with this lr-find's own options."""
    factor = schedule_factor(config, args.stage)
    lr = suggestion / factor
    lines = [f"the smoothed loss falls fastest at lr {suggestion:.2e}"]
    if args.stage:
        lines.append(f"at stage {args.stage}'s start the schedule gives x{factor:.2f} of train.lr")
    lines.append(f"suggested train.lr = {lr:.2e}, at most; a fine-tune of pretrained weights often wants less:")
    command = ["lora_resnet18", *(["--config", args.config] if args.config else [])]
    command += [part for option in args.set if not option.startswith("train.lr=") for part in ("--set", option)]
    command += ["--set", f"train.lr={lr:.2e}", "train", "--out", "RUN"]
    for flag, value in (("--data", args.data), ("--init", args.init), ("--freeze-from", args.freeze_from)):
        if value is not None and value != DEFAULT_DATA:
            command += [flag, value]
    return "\n".join(lines) + "\n  " + shlex.join(command)


def cmd_inspect_weights(args: argparse.Namespace, config: Config) -> int:
    plan = inspect_weights(build_model(config), args.file, config.init)
    print(plan.format())
    minimum = config.init.min_loaded_fraction
    refusal = plan.refusal(minimum)
    if refusal is not None:
        print(f"train --init would refuse this file: {refusal}")
        return 2
    print(f"train --init would accept this file ({plan.fraction():.0%} >= init.min_loaded_fraction = {minimum})")
    return 0


def trained_model(weights: str, config: Config) -> nn.Module:
    """The plain model (no freezing, plain BatchNorm) with every tensor from `weights`.

    A file in a run folder must match its checkpoints.json, as a resume's must.
    """
    check_run_config(weights, config)
    verify_in_run(weights)
    model = build_model(config)
    tensors = read_state_dict(weights)
    if any(".lora_" in key for key in tensors):
        # last.ckpt of a LoRA run: the adapted model, merged as best.* is.
        tensors = merged_checkpoint(prepare_model(config)[0], tensors, weights)
    plan = plan_load(model, tensors, weights, remap=[], first_n=0)
    if plan.missing or plan.unexpected or plan.mismatched:
        raise CheckpointError(f"{weights} does not fit this model: {plan.summary()}")
    model.load_state_dict(plan.tensors)
    return model


def check_run_config(weights: str, config: Config) -> None:
    """Weights run as they were trained: the model and input size of the run's config.toml, if it has one."""
    saved_file = Path(weights).parent / "config.toml"
    if not saved_file.is_file():
        return
    saved = load_config(saved_file)
    keys = [("model", key) for key in vars(config.model) if key != "pretrained"] + [("train", "image_size")]
    for section, key in keys:
        old, new = getattr(getattr(saved, section), key), getattr(getattr(config, section), key)
        if old != new:
            raise ConfigError(
                f"{weights} was trained with {section}.{key} = {old!r}, this config has {new!r}; "
                f"pass --config {saved_file}"
            )


def run_weights(run: Path) -> Path:
    """The weights `--run` reads: the best file, else the last checkpoint."""
    for name in ("best.safetensors", "best.pt", "last.ckpt"):
        if (run / name).is_file():
            return run / name
    raise ConfigError(f"--run {run}: no best.safetensors, best.pt or last.ckpt there")


def run_data(weights: str, data: str | None) -> tuple[str, dict | None]:
    """--data, else the data the weights' run trained on (its data.json), else synthetic; and that record."""
    path = Path(weights).parent / "data.json"
    if data is not None or not path.is_file():
        return data or DEFAULT_DATA, None
    try:
        record = json.loads(path.read_text())
        return str(record["data"]), record
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a run's data record ({type(err).__name__}: {err}); pass --data") from None


def cmd_evaluate(args: argparse.Namespace, config: Config) -> int:
    device = pick_device(args.device)
    if args.out is not None:
        check_destination(Path(args.out), "--out", folder=True)
    model = trained_model(args.weights, config)
    args.data, recorded = run_data(args.weights, args.data)
    # A one-folder dataset validates on the split the weights were trained with.
    train_set, val_set = make_datasets(args.data, config, saved_split(Path(args.weights).parent, args.data))
    if recorded is not None and not same_data(recorded, data_record(args.data, train_set, val_set)):
        raise DataError(
            f"{args.data} has changed since the run of {args.weights} trained on it (its images, or its split.json); "
            "pass --data to evaluate on it as it is now"
        )
    saved, names = read_classes(args.weights), class_names(val_set, config.model.num_classes)
    if saved is not None and saved != names:
        raise DataError(f"{args.weights} was trained on the classes {saved}; --data {args.data} has {names}")
    loader = DataLoader(val_set, batch_size=config.train.batch_size)
    k = 5 if len(names) > 5 else 1  # top-5 where there are more than 5 classes; else top-1, the accuracy
    confusion, loss, top_k = confusion_matrix(model.to(device), loader, device, k)
    result = {"weights": args.weights, **report(confusion, names, loss, k, top_k)}
    if args.out is not None:
        written = write_report(Path(args.out), result, confusion, names)
        result["files"] = [str(path) for path in written]
    print(json.dumps(finite_or_null(result), allow_nan=False) if args.json else table(result))
    return 0


def weights_classes(weights: str, config: Config) -> list[str]:
    """The class names a weights file carries (or class_0, ...), as many as the model has outputs."""
    classes = read_classes(weights) or numbered_classes(config.model.num_classes)
    if len(classes) != config.model.num_classes:
        raise CheckpointError(f"{weights} names {len(classes)} classes; the model has {config.model.num_classes}")
    return classes


def cmd_predict(args: argparse.Namespace, config: Config) -> int:
    device = pick_device(args.device)
    if args.out is not None:
        check_destination(Path(args.out), "--out", folder=False)
    model, classes = trained_model(args.weights, config).to(device).eval(), weights_classes(args.weights, config)
    prep = preprocessing_record(config.train.image_size)
    if args.top_k > len(classes):
        raise ConfigError(f"--top-k {args.top_k}: the model has {len(classes)} classes")
    files = image_files(args.paths)
    workers = predict_workers(config.train.num_workers)
    batch = args.batch_size or config.train.batch_size
    rows, skipped = predict(model, files, classes, prep, args.top_k, batch, device, workers)
    if args.out:
        write_predictions(Path(args.out), rows)
        print(f"wrote {args.out}: {len(files) - len(skipped)} images, top {args.top_k} each")
    else:
        print(format_rows(rows))
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    # 1: the answers are there, but not for every image asked about.
    return 1 if skipped else 0


def config_source(args: argparse.Namespace) -> tuple[str | Path | None, list[str]]:
    """The config file to load and the --set overrides (those before the command, then those after it)."""
    args.set = args.set + getattr(args, "set_after", [])
    return run_config(args), args.set


def run_config(args: argparse.Namespace) -> str | Path | None:
    """--config, else the config.toml of the run that saved the weights: they run as they were trained.

    --run RUN becomes --weights (the run's best file) here, for every command that reads weights.
    """
    if args.command not in ("evaluate", "predict"):
        return args.config
    if args.run is not None:
        args.weights = str(run_weights(Path(args.run)))
    saved = Path(args.weights).parent / "config.toml"
    return args.config if args.config is not None or not saved.is_file() else saved


def run(args: argparse.Namespace) -> int:
    """The command `args` names, with its config; the exit status."""
    commands = {
        "layers": cmd_layers,
        "inspect-weights": cmd_inspect_weights,
        "train": cmd_train,
        "lr-find": cmd_lr_find,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
    }
    try:
        config = load_config(*config_source(args))
        return commands[args.command](args, config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, as Unix tools do; stdout goes
        # to /dev/null so the interpreter's last flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MemoryError, RuntimeError) as err:
        # An allocation the machine cannot make (a huge num_classes, image_size or dataset): one line, not a traceback.
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        why = (str(err).splitlines() or [type(err).__name__])[0]
        advice = "lower train.batch_size, train.image_size or the data's size"
        print(f"error: out of memory ({why}); {advice}", file=sys.stderr)
        return 2
