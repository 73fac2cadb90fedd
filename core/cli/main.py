"""The ``xma2`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from core.errors import ConfigError, Xma2Error


class CommandExtension(Protocol):
    """Commands another package adds to ``xma2`` (the server adds ``serve``)."""

    commands: tuple[str, ...]

    def add(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _add_backbone_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone-file", type=Path, default=None,
        help="quantized backbone (.safetensors); default: the one shipped with xma2",
    )


def build_parser(extensions: Sequence[CommandExtension] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xma2", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="print the crossbar mapping report and classify one image")
    _add_backbone_file(inspect)
    inspect.add_argument("--image", type=Path, default=None,
                         help="image to classify (default: scikit-image's cat photo)")
    inspect.add_argument("--size", type=int, default=224, help="input resolution")
    inspect.add_argument("--summary", action="store_true",
                         help="print only the totals, not every layer's row")
    inspect.add_argument("--fidelity", choices=["ideal", "crossbar"], default="ideal",
                         help="crossbar: emulate ADCs and cell slices (5-bit calibrated ADC)")

    quantize = commands.add_parser(
        "quantize", help="quantize, calibrate and distill a backbone for the chip")
    quantize.add_argument("--backbone", default="mobilenet_v2")
    quantize.add_argument("--weights", type=Path, default=None,
                          help="fp32 checkpoint (required for resnet18/resnet50)")
    quantize.add_argument("--out", type=Path, required=True)
    quantize.add_argument("--steps", type=int, default=800, help="distillation steps (0: PTQ only)")
    quantize.add_argument("--size", type=int, default=64, help="crop size for distillation")
    quantize.add_argument("--seed", type=int, default=0)

    fidelity = commands.add_parser(
        "fidelity", help="measure the 4-bit backbone against fp32 (agreement, linear probes)")
    _add_backbone_file(fidelity)
    fidelity.add_argument("--datasets", default="fashion_mnist,mnist5k,animal_mnist")
    fidelity.add_argument("--size", type=int, default=64)
    fidelity.add_argument("--train-limit", type=int, default=10000)
    fidelity.add_argument("--test-limit", type=int, default=2000)
    fidelity.add_argument("--seed", type=int, default=0)
    fidelity.add_argument("--out", type=Path, default=None, help="write the results as JSON")

    calibrate = commands.add_parser(
        "calibrate-adc", help="re-tune a saved backbone's column ADC ranges from images")
    _add_backbone_file(calibrate)
    calibrate.add_argument("--out", type=Path, default=None,
                           help="where to write the backbone (default: over --backbone-file)")
    calibrate.add_argument("--size", type=int, default=64)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--images", type=int, default=None,
                           help="calibration photo crops (default 512)")
    calibrate.add_argument("--chip", choices=["default", "paper", "lossless"], default=None,
                           help="move the backbone to a named periphery first (the fields "
                           "below override it): the default chip, the paper's (offset cells, "
                           "chance at 5 bits) or the lossless one (9 rows, bit-serial)")
    for name, choices in (("weight-encoding", ["offset", "differential"]),
                          ("dac-mode", ["multi_bit", "bit_serial"])):
        calibrate.add_argument(f"--{name}", choices=choices, default=None,
                               help="move the backbone to this periphery first")
    for name in ("rows-per-read", "adc-bits"):
        calibrate.add_argument(f"--{name}", type=int, default=None,
                               help="move the backbone to this periphery first")

    accuracy = commands.add_parser(
        "crossbar-accuracy",
        help="top-1 of a labelled image set in ideal vs crossbar fidelity (ADC, noise)")
    _add_backbone_file(accuracy)
    accuracy.add_argument("--dataset", default="animal_mnist")
    accuracy.add_argument("--size", type=int, default=64)
    accuracy.add_argument("--train-limit", type=int, default=2000)
    accuracy.add_argument("--test-limit", type=int, default=500)
    accuracy.add_argument("--seed", type=int, default=0)
    accuracy.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    _add_adaptation_commands(commands)
    for extension in extensions:
        extension.add(commands)
    return parser


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    _add_backbone_file(parser)
    parser.add_argument("--size", type=int, default=None,
                        help="input resolution (default: 224 for a published layout, else 64)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="training images (a fixed stratified subset; default: all)")
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training images (default: the method's, 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a method default, e.g. --set mask.init_logit=6 "
                             "--set train.lr_head=3e-3 (repeatable; see docs/adaptation.md)")


def _add_adaptation_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from core.learning.registry import method_names

    adapt = commands.add_parser(
        "adapt", help="adapt the frozen backbone to one dataset with one method")
    adapt.add_argument("--method", default="xma2", choices=method_names())
    adapt.add_argument("--dataset", required=True,
                       help="fashion_mnist, mnist5k, animal_mnist, digits, imagefolder:PATH, "
                            "or a published layout (flowers102, cub200, cub200_cropped, "
                            "stanford_cars, stanford_cars_cropped, split_folders) with "
                            "--dataset-path, or as LAYOUT:PATH")
    adapt.add_argument("--dataset-path", type=Path, default=None,
                       help="folder a published layout was unpacked to")
    adapt.add_argument("--pe-fraction", type=float, default=None,
                       help="xma2 only: share of PEs replaced by spare PEs (default 0.1)")
    adapt.add_argument("--batch-size", type=int, default=None)
    adapt.add_argument("--task-id", default=None, help="name of the task (default: the dataset)")
    adapt.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="write resumable checkpoints here (an existing one is resumed)")
    adapt.add_argument("--out", type=Path, default=None, help="write a JSON summary here")
    _add_training_options(adapt)

    evaluate = commands.add_parser(
        "evaluate", help="run the methods x datasets x P grid and write the results page")
    evaluate.add_argument("--datasets", default="fashion_mnist,mnist5k,animal_mnist",
                          help="comma-separated; a published layout as LAYOUT:PATH, e.g. "
                               "flowers102:/data/flowers")
    evaluate.add_argument("--methods", default=",".join(method_names()))
    evaluate.add_argument("--pe-fractions", default="0.05,0.1,0.2,0.4",
                          help="XMA2's P values, comma-separated fractions")
    evaluate.add_argument("--out", type=Path, default=Path("docs/results/adaptation"),
                          help="prefix of the .md/.json/.csv/.png outputs")
    evaluate.add_argument("--fresh", action="store_true",
                          help="rerun every cell instead of resuming from the JSON")
    _add_training_options(evaluate)

    summary = commands.add_parser(
        "grid-summary", help="mean and spread over seeds of several `evaluate` runs")
    summary.add_argument("results", nargs="+", type=Path,
                         help="the JSON of each run (one seed each, same settings)")
    summary.add_argument("--out", type=Path, required=True,
                         help="prefix of the .md/.json summary")


def main(argv: list[str] | None = None,
         extensions: Sequence[CommandExtension] = ()) -> int:
    args = build_parser(extensions).parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        for extension in extensions:
            if args.command in extension.commands:
                return extension.run(args)
        with torch.set_grad_enabled(args.command in ("quantize", "adapt", "evaluate")):
            return _run(args)
    except Xma2Error as e:
        print(f"xma2: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from core.cli.commands import inspect

        inspect(args.backbone_file, args.image, args.size, not args.summary, args.fidelity)
    elif args.command == "quantize":
        from core.cli.commands import quantize

        quantize(args.backbone, args.weights, args.out, args.steps, args.size, args.seed)
    elif args.command == "fidelity":
        from core.cli.commands import fidelity, fidelity_markdown

        started = time.perf_counter()
        result = fidelity(args.backbone_file, args.datasets.split(","), args.size,
                          args.train_limit, args.test_limit, args.seed)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(fidelity_markdown(result))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "calibrate-adc":
        from core.backbones.shipped import default_backbone_path
        from core.cli.commands import calibrate_adc

        out = args.out or args.backbone_file
        if out is None:
            raise ConfigError("give --out (or --backbone-file to update a backbone in place); "
                              f"the shipped one is {default_backbone_path()}")
        from core.chip.config import CHIP_PRESETS

        chip = {**(CHIP_PRESETS[args.chip] if args.chip else {}),
                **{name: getattr(args, name) for name in
                   ("weight_encoding", "dac_mode", "rows_per_read", "adc_bits")
                   if getattr(args, name) is not None}}
        calibrate_adc(args.backbone_file, out, args.size, args.seed, chip=chip,
                      images=args.images, command=command_line(args.argv))
    elif args.command == "crossbar-accuracy":
        from core.cli.commands import crossbar_accuracy, crossbar_accuracy_markdown

        started = time.perf_counter()
        result = crossbar_accuracy(args.backbone_file, args.dataset, args.size,
                                   args.train_limit, args.test_limit, args.seed)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(crossbar_accuracy_markdown(result))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "grid-summary":
        from core.cli.evaluate import DATASET_TITLES, METHOD_TITLES
        from core.cli.grid_summary import render_summary, summarize

        missing = [str(p) for p in args.results if not p.is_file()]
        if missing:
            raise ConfigError(f"no such grid result: {', '.join(missing)} (make one with "
                              "`xma2 evaluate --seed S --out PREFIX`)")
        runs = [json.loads(p.read_text()) for p in args.results]
        print(render_summary(summarize(runs), args.out, METHOD_TITLES, DATASET_TITLES))
    elif args.command in ("adapt", "evaluate"):
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        _run_adaptation(args)
    return 0


def command_line(argv: list[str]) -> str:
    import shlex

    return " ".join(["xma2", *(shlex.quote(a) for a in argv)])


def adapt_dataset_name(dataset: str, path: Path | None) -> str:
    """``--dataset flowers102 --dataset-path P`` -> ``flowers102:P``; other names unchanged."""
    from core.data.published_datasets import LAYOUTS, layout_name

    if dataset in LAYOUTS:
        if path is None:
            raise ConfigError(f"{dataset} is a published layout: give --dataset-path, the "
                              "folder it was unpacked to (or --dataset LAYOUT:PATH)")
        return layout_name(dataset, path)
    if path is not None:
        raise ConfigError(f"--dataset-path goes with a published layout "
                          f"({', '.join(LAYOUTS)}), not {dataset}")
    return dataset


def _run_adaptation(args: argparse.Namespace) -> None:
    from core.backbones.shipped import git_revision, load_backbone
    from core.data.published_datasets import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_IMAGE_SIZE,
        is_layout_name,
        photo_method_config,
    )
    from core.learning.registry import override_config, parse_settings

    if args.command == "evaluate":
        from core.cli.evaluate import GridConfig, render_markdown, run_grid

        try:
            fractions = tuple(float(p) for p in args.pe_fractions.split(","))
        except ValueError as e:
            raise ConfigError(f"--pe-fractions must be comma-separated numbers such as "
                              f"0.05,0.1 ({e})") from e
        datasets = tuple(args.datasets.split(","))
        methods = tuple(args.methods.split(","))
        photos = any(is_layout_name(d) for d in datasets)
        settings = parse_settings(args.settings)
        if photos:  # 224-px steps at the usual batch of 64 need twice the memory
            settings.setdefault("train.batch_size", str(DEFAULT_BATCH_SIZE))
            if "xma2" in methods:
                settings.setdefault("ranking_batch_size", settings["train.batch_size"])
        grid = GridConfig(
            datasets=datasets, methods=methods,
            pe_fractions=fractions,
            image_size=args.size or (DEFAULT_IMAGE_SIZE if photos else GridConfig.image_size),
            train_limit=args.train_limit or GridConfig.train_limit,
            test_limit=args.test_limit, epochs=args.epochs or GridConfig.epochs, seed=args.seed,
            settings=tuple(settings.items()))
        grid_result = run_grid(grid, load_backbone(args.backbone_file),
                          load_backbone(args.backbone_file), args.out,
                          command=command_line(args.argv), git_revision=git_revision(),
                          resume=not args.fresh, threads=torch.get_num_threads(),
                          progress=True)
        print(render_markdown(grid_result, args.out))
        return

    from core.data.datasets import DatasetSpec, load_dataset
    from core.learning import RunOptions, adapt, default_config
    from core.learning.common import accuracy

    dataset = adapt_dataset_name(args.dataset, args.dataset_path)
    photos = is_layout_name(dataset)
    data = load_dataset(DatasetSpec(
        dataset, image_size=args.size or (DEFAULT_IMAGE_SIZE if photos else 64),
        seed=args.seed, train_limit=args.train_limit, test_limit=args.test_limit))
    batch_size = args.batch_size or (DEFAULT_BATCH_SIZE if photos else None)
    config = override_config(
        default_config(args.method, pe_fraction=args.pe_fraction, epochs=args.epochs,
                       batch_size=batch_size, seed=args.seed),
        parse_settings(args.settings))
    if photos:
        config = photo_method_config(config)
    short = dataset.partition(":")[0] if photos else args.dataset
    task_id = args.task_id or f"{short}-{args.method}".replace("_", "-").lower()
    started = time.perf_counter()
    result = adapt(args.method, load_backbone(args.backbone_file), data, task_id, config,
                   RunOptions(checkpoint_dir=args.checkpoint_dir, progress=True))
    seconds = time.perf_counter() - started
    if result.task is not None:
        from core.engine import CrossbarEngine

        engine = CrossbarEngine(load_backbone(args.backbone_file))
        engine.add_task(result.task)
        test = accuracy(lambda x: engine.forward(x, task_id), data.test)
    else:
        assert result.trained_model is not None
        test = accuracy(result.trained_model, data.test)
    summary = {
        "command": command_line(args.argv), "git_revision": git_revision(),
        "method": args.method, "dataset": data.describe()["sizes"] | {"name": dataset},
        "threads": torch.get_num_threads(), "steps": result.steps,
        "adapt_seconds": round(result.seconds, 1), "seconds_with_test": round(seconds, 1),
        "val_accuracy": result.val_accuracy, "test_accuracy": test, "config": result.config,
        "details": result.details, "history": result.history,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
