"""``xma2``: the core commands plus ``serve``, ``build-default-tasks``,
``build-imagenet-task`` and the server-side studies (``chip-frontier``,
``calibrate-tasks``, ``calibration-report``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli import main as core_cli

if TYPE_CHECKING:
    from server.chip_adaptation import Readaptation

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
"""glibc returns large freed blocks to the OS, so every forward pass would pay fresh page
faults for its activations; these keep freed memory in the process (docs/performance.md)."""

SECRET_SETTINGS = ("api_key",)
"""Settings taken from the environment only (a flag would show in the process list)."""


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for name, field in Settings.model_fields.items():
        if name in SECRET_SETTINGS:
            continue
        flag = f"--{name.replace('_', '-')}"
        first_line = (field.description or '').splitlines()[0].replace('%', '%%')
        help_text = f"{first_line} [XMA2_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=help_text)


class ServerCommands:
    commands: tuple[str, ...] = ("serve", "build-default-tasks", "build-imagenet-task",
                                 "chip-frontier", "calibrate-tasks", "calibration-report")

    def add(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        serve = commands.add_parser(
            "serve", help="run the HTTP server (settings also come from XMA2_* variables)")
        _setting_flags(serve)

        build = commands.add_parser(
            "build-default-tasks",
            help="adapt the backbone to the shipped datasets and write the task archives")
        build.add_argument("--out", type=Path, default=None,
                           help="folder of archives and tasks.json (default: the server's "
                                "shipped folder)")
        build.add_argument("--tasks", default=None,
                           help="comma-separated names (default: all shipped tasks)")
        build.add_argument("--backbone-file", type=Path, default=None)
        build.add_argument("--size", type=int, default=None)
        build.add_argument("--train-limit", type=int, default=None)
        build.add_argument("--test-limit", type=int, default=None)
        build.add_argument("--epochs", type=int, default=None,
                           help="passes over the training images (default: 5, 12 for mnist, "
                                "whose 3,600 images would otherwise give it half the steps)")
        build.add_argument("--seed", type=int, default=None)
        build.add_argument("--start-from", type=Path, default=None,
                           help="folder of an earlier build (e.g. server/default_tasks) "
                                "whose tasks this build continues: only a chip stage runs")
        build.add_argument("--chip-epochs", type=int, default=None,
                           help="epochs of the second stage, with the chip in the loop "
                                "(default: 3-6 per task on a lossy chip, 0 on a lossless one)")
        build.add_argument("--chip-agreement", type=float, default=None,
                           help="weight of the term that teaches the ideal view the chip's "
                                "answers in the chip stage (default: the weight adaptation "
                                "jobs use)")
        build.add_argument("--threads", type=int, default=None)

        imagenet = commands.add_parser(
            "build-imagenet-task",
            help="distill the built-in ImageNet task (BatchNorm terms and head) from the fp32 "
                 "model on photo crops and write imagenet.tar and imagenet.json")
        imagenet.add_argument("--out", type=Path, default=None,
                              help="folder of imagenet.tar and imagenet.json (default: the "
                                   "server's shipped folder)")
        imagenet.add_argument("--backbone-file", type=Path, default=None)
        imagenet.add_argument("--steps", type=int, default=None)
        imagenet.add_argument("--batch-size", type=int, default=None)
        imagenet.add_argument("--lr-batchnorm", type=float, default=None)
        imagenet.add_argument("--lr-head", type=float, default=None)
        imagenet.add_argument("--temperature", type=float, default=None)
        imagenet.add_argument("--mixup", type=float, default=None,
                              help="share of crops mixed with another (default 0.5)")
        imagenet.add_argument("--pe-fraction", type=float, default=None,
                              help="share of PEs replaced by trained spare PEs (default 0)")
        imagenet.add_argument("--photos", default=None,
                              help="comma-separated bundled photos to cut crops from "
                                   "(default: the calibration photos and the natural ones)")
        imagenet.add_argument("--chip-periphery", action="store_true",
                              help="read the (lossy) chip in every training pass")
        imagenet.add_argument("--seed", type=int, default=None)
        imagenet.add_argument("--agreement-crops", type=int, default=200,
                              help="held-out crops agreement is measured on (200: those of "
                                   "`xma2 fidelity`)")
        imagenet.add_argument("--crossbar-crops", type=int, default=200,
                              help="of those, how many also run in crossbar fidelity when "
                                   "the chip is lossy (0: none)")
        imagenet.add_argument("--keep-worse", action="store_true",
                              help="write the task even when it agrees with fp32 less often "
                                   "than the bare head (default: keep the earlier archive)")
        imagenet.add_argument("--threads", type=int, default=None)

        frontier = commands.add_parser(
            "chip-frontier",
            help="sweep the chip's periphery (encoding, rows per read, ADC bits, DAC) and "
                 "record accuracy of the shipped tasks against energy")
        frontier.add_argument("--out", type=Path, required=True,
                              help="JSON file (a .md table and a .png plot go beside it)")
        frontier.add_argument("--encodings", default="offset,differential")
        frontier.add_argument("--rows", default="72,36,18,9", help="rows per read")
        frontier.add_argument("--adc-bits", default="4,5,6,8")
        frontier.add_argument("--dac", default="multi_bit,bit_serial")
        frontier.add_argument("--test-limit", type=int, default=1000,
                              help="test images per shipped task")
        frontier.add_argument("--calibration-images", type=int, default=512)
        frontier.add_argument("--seed", type=int, default=0)
        frontier.add_argument("--backbone-file", type=Path, default=None)
        frontier.add_argument("--threads", type=int, default=None)
        frontier.add_argument("--price-only", action="store_true",
                              help="price every point with the energy model and mark the "
                                   "provably lossless ones; emulate nothing")
        frontier.add_argument("--noise", action="store_true",
                              help="instead: each device effect alone (and all four) on the "
                                   "backbone's own chip, at the low and high levels")
        frontier.add_argument("--noise-levels", default="low,high",
                              help="with --noise: levels of core.chip.config.NOISE_LEVELS, or none "
                              "(the chip's periphery alone, with agreement)")
        frontier.add_argument("--tasks", default=None,
                              help="with --noise or --adapt-on-chip: comma-separated shipped "
                                   "tasks (default: all)")
        frontier.add_argument("--no-effects", action="store_true",
                              help="with --noise: only all four effects together")
        frontier.add_argument("--adapt-for-noise", action="store_true",
                              help="with --noise: also adapt each shipped task again for the "
                                   "noisy chip (train.chip_noise) and serve it there")
        frontier.add_argument("--adapt-on-chip", action="store_true",
                              help="instead: on each point, adapt the shipped tasks again with "
                                   "the chip in the training loop (train.chip_periphery) and "
                                   "without it (same budget), and serve all on that chip")
        frontier.add_argument("--adapt-train-limit", type=int, default=None,
                              help="training images per task when adapting (default: 10000 "
                                   "for noise, 2000 on a chip)")
        frontier.add_argument("--adapt-epochs", type=int, default=None,
                              help="epochs when adapting (default: the shipped ones)")
        frontier.add_argument("--adapt-warm-start", type=int, default=512,
                              help="with --adapt-on-chip: images that fit the initial head")
        frontier.add_argument("--adapt-seed", type=int, default=None,
                              help="with --adapt-on-chip or --adapt-for-noise: training seed "
                                   "(default: the shipped recipe's; the test images stay the "
                                   "same)")
        frontier.add_argument("--no-control", action="store_true",
                              help="with --adapt-on-chip: skip the adaptation without the loop")
        frontier.add_argument("--adapt-from-shipped", action="store_true",
                              help="with --adapt-on-chip or --adapt-for-noise: start from "
                                   "the shipped task (its PEs, codes, masks, BatchNorm terms "
                                   "and head) rather than from the backbone")
        frontier.add_argument("--adapt-set", action="append", default=[], metavar="KEY=VALUE",
                              help="with --adapt-on-chip or --adapt-for-noise: override a "
                                   "setting of the recipe (e.g. train.chip_periphery=true for "
                                   "a noise-aware chip stage; repeatable; as `xma2 adapt "
                                   "--set`)")

        calibrate = commands.add_parser(
            "calibrate-tasks",
            help="fit the temperature and OOD threshold of existing tasks without retraining: "
                 "the shipped archives (rewritten with tasks.json) or a store's tasks (a new "
                 "version each)")
        calibrate.add_argument("--tasks", default=None,
                               help="comma-separated names (default: all)")
        calibrate.add_argument("--folder", type=Path, default=None,
                               help="folder of archives and tasks.json (default: the "
                                    "server's shipped folder)")
        calibrate.add_argument("--store", type=Path, default=None,
                               help="calibrate the tasks of this store instead")
        calibrate.add_argument("--data-root", type=Path, default=None,
                               help="with --store: where image-folder datasets lie")
        calibrate.add_argument("--backbone-file", type=Path, default=None)
        calibrate.add_argument("--threads", type=int, default=None)

        report = commands.add_parser(
            "calibration-report",
            help="NLL, 15-bin ECE and accuracy before and after temperature scaling, and "
                 "OOD flag rates, of every shipped task")
        report.add_argument("--out", type=Path, required=True,
                            help="JSON file (a .md table goes beside it)")
        report.add_argument("--folder", type=Path, default=None,
                            help="folder of archives and tasks.json (default: shipped)")
        report.add_argument("--test-limit", type=int, default=2000,
                            help="test images per task (mnist5k has 1,000)")
        report.add_argument("--photo-crops", type=int, default=1000)
        report.add_argument("--seed", type=int, default=0)
        report.add_argument("--backbone-file", type=Path, default=None)
        report.add_argument("--threads", type=int, default=None)

    def run(self, args: argparse.Namespace) -> int:
        if args.command == "serve":
            return serve(args)
        if args.command == "chip-frontier":
            return chip_frontier(args)
        if args.command == "calibrate-tasks":
            return calibrate_tasks(args)
        if args.command == "calibration-report":
            return calibration_report(args)
        if args.command == "build-imagenet-task":
            return build_imagenet(args)
        return build(args)


def serve(args: argparse.Namespace) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.settings import Settings

    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields
        if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        print(f"xma2: error: bad setting: {problems}", file=sys.stderr)
        return 2
    from server import logs

    secrets = [settings.api_key.get_secret_value()] if settings.api_key else []
    logs.configure(settings.log_level, secrets)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, log_config=None,
                timeout_keep_alive=settings.keep_alive_s)
    return 0


def _batch_command(args: argparse.Namespace, *, timestamps: bool = False) -> None:
    """Progress to the log, and the CPU threads asked for (long offline commands)."""
    import torch

    start = "%(asctime)s" if timestamps else "%(levelname)s"
    logging.basicConfig(level=logging.INFO, format=f"{start} %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def build(args: argparse.Namespace) -> int:
    import torch

    from server.shipped_tasks import SHIPPED, SHIPPED_DIR, BuildConfig, build_default_tasks

    _batch_command(args)
    defaults = BuildConfig()
    config = BuildConfig(
        image_size=args.size or defaults.image_size,
        train_limit=args.train_limit or defaults.train_limit,
        test_limit=args.test_limit or defaults.test_limit,
        epochs=args.epochs or defaults.epochs,
        seed=defaults.seed if args.seed is None else args.seed,
        chip_epochs=args.chip_epochs,
        chip_agreement=(defaults.chip_agreement if args.chip_agreement is None
                        else args.chip_agreement))
    names = args.tasks.split(",") if args.tasks else list(SHIPPED)
    with torch.set_grad_enabled(True):
        index = build_default_tasks(args.out or SHIPPED_DIR, names, config,
                                    backbone_file=args.backbone_file,
                                    command=core_cli.command_line(args.argv),
                                    start_from=args.start_from)
    for entry in index["tasks"]:
        metrics = entry["metrics"]
        print(f"{entry['name']}: test accuracy {metrics['test_accuracy']:.1%} ideal, "
              f"{metrics.get('crossbar_test_accuracy', float('nan')):.1%} on the chip "
              f"(agreement {metrics.get('crossbar_agreement', float('nan')):.1%}), "
              f"{entry['bytes']:,} bytes")
    return 0


def build_imagenet(args: argparse.Namespace) -> int:
    import torch

    from core.learning.imagenet_task import ImagenetTaskConfig
    from server.imagenet_task import build_imagenet_task
    from server.shipped_tasks import SHIPPED_DIR

    _batch_command(args, timestamps=True)
    options = {"steps": args.steps, "batch_size": args.batch_size,
               "lr_batchnorm": args.lr_batchnorm, "lr_head": args.lr_head,
               "temperature": args.temperature, "mixup": args.mixup,
               "pe_fraction": args.pe_fraction, "seed": args.seed,
               "photos": tuple(args.photos.split(",")) if args.photos else None,
               "chip_periphery": args.chip_periphery or None}
    config = ImagenetTaskConfig(**{k: v for k, v in options.items() if v is not None})
    with torch.set_grad_enabled(True):
        record = build_imagenet_task(args.out or SHIPPED_DIR, config,
                                     backbone_file=args.backbone_file,
                                     command=core_cli.command_line(args.argv),
                                     agreement_crops=args.agreement_crops,
                                     crossbar_crops=args.crossbar_crops,
                                     keep_worse=args.keep_worse)
    bare, distilled = record["agreement"]["bare"], record["agreement"]["distilled"]
    crops = record["agreement"]["held_out"]["crops"]
    print(f"top-1 agreement with fp32 on {crops} held-out crops (ideal fidelity): "
          f"{bare['ideal']:.1%} bare -> {distilled['ideal']:.1%} distilled")
    if "crossbar" in distilled:
        print(f"crossbar fidelity, first {record['agreement']['held_out']['crossbar_crops']} "
              f"crops: {bare['crossbar']:.1%} bare -> {distilled['crossbar']:.1%} distilled")
    print(f"{record['steps']} steps in {record['train_seconds']:.0f} s "
          f"({record['seconds_per_step']:.2f} s/step)")
    if record["archive"] is None:
        print(f"not written: {record['rejected']}")
        return 1
    print(f"wrote {record['bytes']:,} bytes")
    return 0


def _readaptation(args: argparse.Namespace, *, train_limit: int, warm_start: int | None,
                  control: bool) -> Readaptation:
    """The re-adaptation budget of ``chip-frontier --adapt-on-chip`` or ``--adapt-for-noise``
    from the ``--adapt-*`` flags (``train_limit``: the mode's default image count)."""
    from core.learning.registry import parse_settings
    from server.chip_adaptation import Readaptation

    return Readaptation(args.adapt_train_limit or train_limit, args.adapt_epochs, warm_start,
                        seed=args.adapt_seed, control=control,
                        from_shipped=args.adapt_from_shipped,
                        settings=tuple(sorted(parse_settings(args.adapt_set).items())))


def chip_frontier(args: argparse.Namespace) -> int:

    from server import frontier

    _batch_command(args, timestamps=True)
    if args.price_only:
        priced = frontier.price(
            args.out, frontier.grid(args.encodings.split(","),
                                    [int(r) for r in args.rows.split(",")],
                                    [int(b) for b in args.adc_bits.split(",")],
                                    args.dac.split(",")),
            command=core_cli.command_line(args.argv), backbone_file=args.backbone_file)
        print(args.out.with_suffix(".md").read_text())
        return 0 if priced["rows"] else 1
    if args.noise:
        from core.chip.config import NOISE_LEVELS
        from core.errors import ConfigError
        from server import noise_study

        levels = tuple(args.noise_levels.split(","))
        unknown = sorted(set(levels) - {"none", *NOISE_LEVELS})
        if unknown:
            raise ConfigError(f"unknown noise level(s) {unknown}; choose from none, "
                              f"{', '.join(NOISE_LEVELS)}")
        adaptation = _readaptation(args, train_limit=10000, warm_start=None,
                                   control=False) if args.adapt_for_noise else None
        noise = noise_study.noise_study(args.out, test_limit=args.test_limit,
                                        command=core_cli.command_line(args.argv),
                                        backbone_file=args.backbone_file, levels=levels,
                                        effects=not args.no_effects, adaptation=adaptation,
                                        names=args.tasks.split(",") if args.tasks else None)
        print(noise_study.markdown(noise))
        return 0
    points = frontier.grid(args.encodings.split(","), [int(r) for r in args.rows.split(",")],
                           [int(b) for b in args.adc_bits.split(",")], args.dac.split(","))
    if args.adapt_on_chip:
        from server import chip_adaptation

        budget = _readaptation(args, train_limit=2000, warm_start=args.adapt_warm_start,
                               control=not args.no_control)
        adapted = chip_adaptation.adapt_on_chip(
            args.out, points, test_limit=args.test_limit,
            calibration_images=args.calibration_images, seed=args.seed,
            command=core_cli.command_line(args.argv), budget=budget,
            names=args.tasks.split(",") if args.tasks else None,
            backbone_file=args.backbone_file)
        print(chip_adaptation.markdown(adapted))
        return 0
    result = frontier.run(args.out, points, test_limit=args.test_limit,
                          calibration_images=args.calibration_images, seed=args.seed,
                          command=core_cli.command_line(args.argv),
                          backbone_file=args.backbone_file)
    print(frontier.markdown(result))
    print(f"default chip (lowest energy within {frontier.ACCURACY_TOLERANCE} point of ideal "
          f"at 5 bits): {result['default_chip']}")
    return 0


def calibrate_tasks(args: argparse.Namespace) -> int:

    from core.backbones.shipped import load_backbone
    from server import confidence_tasks
    from server.shipped_tasks import SHIPPED_DIR
    from task_store import TaskStore

    _batch_command(args)
    names = args.tasks.split(",") if args.tasks else None
    model = load_backbone(args.backbone_file)
    if args.store is not None:
        if not args.store.is_dir():
            raise SystemExit(f"xma2: error: no task store at {args.store}")
        with TaskStore.for_model(args.store, model) as store:
            done = confidence_tasks.calibrate_store(store, names, model=model,
                                                    data_root=args.data_root)
        for name, version, c in done:
            print(f"{name}: version {version}, T {c.temperature:.3f}, OOD threshold "
                  f"{c.ood_threshold:.4g} ({c.ood_score.value})")
        return 0
    index = confidence_tasks.calibrate_shipped(
        args.folder or SHIPPED_DIR, names, model=model,
        command=core_cli.command_line(args.argv))
    for entry in index["tasks"]:
        c = entry.get("confidence")
        if c and (not names or entry["name"] in names):
            print(f"{entry['name']}: T {c['temperature']:.3f}, OOD threshold "
                  f"{c['ood_threshold']:.4g} ({c['ood_score']}), validation ECE "
                  f"{c['val_ece_before']:.4f} -> {c['val_ece_after']:.4f}")
    return 0


def calibration_report(args: argparse.Namespace) -> int:

    from core.backbones.shipped import git_revision, load_backbone
    from server import confidence_tasks
    from server.shipped_tasks import SHIPPED_DIR

    _batch_command(args)
    confidence_tasks.report(
        args.out, args.folder or SHIPPED_DIR, model=load_backbone(args.backbone_file),
        test_limit=args.test_limit, photo_crops=args.photo_crops, seed=args.seed,
        command=core_cli.command_line(args.argv), git_revision=git_revision())
    print(args.out.with_suffix(".md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return core_cli.main(argv, extensions=[ServerCommands()])


if __name__ == "__main__":
    raise SystemExit(main())
