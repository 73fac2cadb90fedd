"""The ``xma2`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from core.errors import Xma2Error


def _add_backbone_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone-file", type=Path, default=None,
        help="quantized backbone (.safetensors); default: the one shipped with xma2",
    )


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with torch.set_grad_enabled(args.command == "quantize"):
            return _run(args)
    except Xma2Error as e:
        print(f"xma2: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from core.commands import inspect

        inspect(args.backbone_file, args.image, args.size, not args.summary)
    elif args.command == "quantize":
        from core.commands import quantize

        quantize(args.backbone, args.weights, args.out, args.steps, args.size, args.seed)
    elif args.command == "fidelity":
        from core.commands import fidelity, fidelity_markdown

        started = time.perf_counter()
        result = fidelity(args.backbone_file, args.datasets.split(","), args.size,
                          args.train_limit, args.test_limit, args.seed)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(fidelity_markdown(result))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
