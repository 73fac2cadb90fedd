"""Mean and spread over seeds of several runs of the adaptation grid.

One grid run is one seed (``xma2 evaluate --seed S``); a method ordering is a finding only
where the gap exceeds the seed-to-seed spread, so the summary puts mean +- standard
deviation (sample, n - 1) beside the number of seeds of every cell, and says for each
dataset whether the paper's ordering (XMA2 at P = 10% > XMA > piggyback) holds by more
than the spread.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes
from core.errors import ConfigError

__all__ = ["render_summary", "summarize"]

_DECISIVE = ("image_size", "train_limit", "test_limit", "epochs", "settings")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell key: test/val accuracy mean, std and seeds; switching energy likewise."""
    if not runs:
        raise ConfigError("no grid results to summarize")
    first = {k: json.dumps(runs[0]["grid"].get(k)) for k in _DECISIVE}
    for run in runs[1:]:
        differs = [k for k in _DECISIVE if json.dumps(run["grid"].get(k)) != first[k]]
        if differs:
            raise ConfigError(f"grid runs differ in {differs}: only seeds may differ")
    seeds = [run["grid"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"two runs have the same seed ({seeds})")
    cells: dict[str, dict[str, Any]] = {}
    for run in runs:
        for key, cell in run["cells"].items():
            entry = cells.setdefault(key, {"dataset": cell["dataset"], "method": cell["method"],
                                           "pe_fraction": cell["pe_fraction"], "seeds": [],
                                           "test_accuracy": [], "val_accuracy": [],
                                           "seconds": []})
            entry["seeds"].append(run["grid"]["seed"])
            for field in ("test_accuracy", "val_accuracy", "seconds"):
                entry[field].append(cell[field])
    switching: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for method_key, pairs in (run.get("switching") or {}).items():
            if pairs:
                values = [v["energy_j"] for v in pairs.values()]
                switching.setdefault(method_key, {"energy_j": []})["energy_j"].append(
                    sum(values) / len(values))
    return {"grid": runs[0]["grid"] | {"seed": None}, "seeds": seeds,
            "revisions": sorted({run["git_revision"] for run in runs}),
            "commands": [run["command"] for run in runs],
            "cells": {key: _stats(entry) for key, entry in cells.items()},
            "switching": {key: _stats(entry) for key, entry in switching.items()}}


def _stats(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    for field, values in entry.items():
        if field in ("test_accuracy", "val_accuracy", "seconds", "energy_j"):
            out[field] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "values": values}
    return out


def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    n = len(stat["values"])
    text = f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"
    return text if n > 1 else f"{scale * stat['mean']:.{digits}f} (1 seed)"


def render_summary(summary: dict[str, Any], out_prefix: Path,
                   method_titles: dict[str, str], dataset_titles: dict[str, str]) -> str:
    """Markdown page beside ``out_prefix.json``; both written atomically, text returned."""
    cells = summary["cells"]
    datasets = list(dict.fromkeys(c["dataset"] for c in cells.values()))
    rows = list(dict.fromkeys((c["method"], c["pe_fraction"]) for c in cells.values()))
    grid = summary["grid"]
    lines = ["# Adaptation grid over seeds", "",
             f"Seeds {summary['seeds']}; {grid['image_size']}x{grid['image_size']} inputs, "
             f"{grid['epochs']} epochs over at most {grid['train_limit']} training images, "
             f"test on at most {grid['test_limit']}; revisions "
             f"{', '.join(summary['revisions'])}. Test top-1 %, mean ± standard deviation "
             "over seeds. Made by:", "", "```sh", *summary["commands"], "```", "",
             "| method | " + " | ".join(dataset_titles.get(d, d) for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for method, p in rows:
        label = method_titles.get(method, method) + (f" (P = {p:.0%})" if p is not None else "")
        values = []
        for d in datasets:
            key = f"{d}/{method}" + ("" if p is None else f"@{p:g}")
            values.append(_pm(cells[key]["test_accuracy"]) if key in cells else "—")
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    lines += [""]
    verdicts = []
    for d in datasets:
        trio = [cells.get(f"{d}/xma2@0.1"), cells.get(f"{d}/xma"), cells.get(f"{d}/piggyback")]
        if any(c is None for c in trio):
            continue
        means = [c["test_accuracy"]["mean"] for c in trio if c]
        spread = max(c["test_accuracy"]["std"] for c in trio if c)
        gaps = [means[0] - means[1], means[1] - means[2]]
        single = min(len(c["test_accuracy"]["values"]) for c in trio if c) < 2
        if single:  # no spread to judge against: one seed says only what the means say
            verdict = ("holds in the means of one seed" if all(g > 0 for g in gaps)
                       else "does not hold in one seed")
        elif all(g > spread for g in gaps):
            verdict = "holds beyond the spread"
        elif all(g > 0 for g in gaps):
            verdict = "holds in the means, within the spread"
        else:
            verdict = "does not hold"
        spread_text = "no spread yet" if single else f"largest std {100 * spread:.2f}"
        verdicts.append(f"{dataset_titles.get(d, d)}: {verdict} (gaps "
                        f"{100 * gaps[0]:+.2f} / {100 * gaps[1]:+.2f} points, {spread_text})")
    if verdicts:
        lines += ["Paper's ordering XMA2 (P = 10%) > XMA > piggyback: " + "; ".join(verdicts)
                  + ".", ""]
    switching = summary.get("switching") or {}
    ref = switching.get("xma2@0.1")
    if switching:
        lines += ["A -> B -> A switching energy (uJ, mean over dataset pairs, then over "
                  "seeds) and its ratio to XMA2 (P = 10%); the paper reports 13.72x for "
                  "fine-tuning and 4.38x for piggyback:", "",
                  "| method | energy (uJ) | / XMA2 (P = 10%) |", "|---|---|---|"]
        for key, stat in sorted(switching.items()):
            method, _, p = key.partition("@")
            label = method_titles.get(method, method) + (f" (P = {float(p):.0%})" if p else "")
            ratio = (f"{stat['energy_j']['mean'] / ref['energy_j']['mean']:.2f}x"
                     if ref and ref["energy_j"]["mean"] else "—")
            lines.append(f"| {label} | {_pm(stat['energy_j'], 1e6, 3)} | {ratio} |")
        lines.append("")
    text = "\n".join(lines)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_prefix.with_suffix(".json"),
                       (json.dumps(summary, indent=1) + "\n").encode())
    atomic_write_bytes(out_prefix.with_suffix(".md"), text.encode())
    return text
