from __future__ import annotations

import json

import pytest

from core.cli.main import main


@pytest.mark.slow
def test_adapt_command_trains_serves_and_writes_a_summary(tmp_path, capsys):
    out = tmp_path / "summary.json"
    code = main(["adapt", "--method", "xbm", "--dataset", "digits", "--size", "32",
                 "--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--threads", "1",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["method"] == "xbm" and summary["steps"] == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["command"].startswith("xma2 adapt --method xbm")
    assert (tmp_path / "ckpt" / "checkpoint.json").is_file()


def test_evaluate_command_explains_bad_fractions(capsys):
    assert main(["evaluate", "--pe-fractions", "ten", "--datasets", "digits"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_adapt_command_rejects_pe_fraction_for_other_methods(capsys):
    assert main(["adapt", "--method", "xma", "--dataset", "digits", "--pe-fraction",
                 "0.1"]) == 2
    assert "only applies to xma2" in capsys.readouterr().err


def test_evaluate_command_rejects_a_setting_no_method_has(capsys):
    assert main(["evaluate", "--methods", "head_bn", "--set", "mask.init_logit=6",
                 "--datasets", "digits"]) == 2
    assert "no method in the grid has the setting 'mask.init_logit'" in capsys.readouterr().err
