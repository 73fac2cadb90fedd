"""A task that would fail at inference is refused on import, and a task that fails on the
chip anyway fails only its own requests, not the others in its batch."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from core.backbones.shipped import imagenet_task, load_backbone
from core.chip.config import Fidelity
from core.task_state import TaskHead, TaskState
from server.errors import ChipFailure, http_answer
from server.runtime import BatchItem, Prediction, ServedTask, TaskRuntime
from task_store import TaskStore
from task_store.format import FORMAT_TAG, sha256_hex
from tests.server.live import LiveServer, tar_bytes


def _tampered(archive: bytes, change: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    """``archive`` with its tensors edited and the manifest's size and SHA-256 recomputed,
    as a careful attacker (or a buggy exporter) would leave it."""
    members = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            stream = tar.extractfile(member)
            assert stream is not None
            members[member.name] = stream.read()
    tensors = load_tensors(members["task.safetensors"])
    change(tensors)
    data = save_tensors(tensors, metadata={"format": FORMAT_TAG})
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["task.safetensors"] = {"sha256": sha256_hex(data), "bytes": len(data)}
    manifest["digital"] = sorted(n.removeprefix("digital/") for n in tensors
                                 if n.startswith("digital/"))
    members = {"manifest.json": json.dumps(manifest).encode(), "task.safetensors": data}
    return tar_bytes(members)


def _half_bias(t: dict[str, torch.Tensor]) -> None:
    t["head/bias"] = t["head/bias"].half()


def _nan_bias(t: dict[str, torch.Tensor]) -> None:
    t["head/bias"] = torch.full_like(t["head/bias"], float("nan"))


def _wide_head(t: dict[str, torch.Tensor]) -> None:
    w = t["head/weight"]
    t["head/weight"] = torch.cat([w, w[:, :3]], dim=1)


def _half_digital(t: dict[str, torch.Tensor]) -> None:
    name = next(n for n in t if n.startswith("digital/"))
    t[name] = t[name].half()


def _negative_variance(t: dict[str, torch.Tensor]) -> None:
    t["digital/features.1.conv.2.running_var"] = -torch.ones(16)


@pytest.mark.parametrize(("change", "tensor"), [
    (_half_bias, "head/bias"), (_nan_bias, "head/bias"), (_wide_head, "head/weight"),
    (_half_digital, "digital/"), (_negative_variance, "running_var")])
def test_an_archive_that_would_fail_at_inference_is_refused(
        server: LiveServer, change: Callable[[dict[str, torch.Tensor]], None],
        tensor: str) -> None:
    with server.operator() as op:
        archive = op.get("/tasks/mnist/archive").content
        name = f"bad-{change.__name__.strip('_').replace('_', '-')}"
        r = op.post("/tasks", params={"name": name}, content=_tampered(archive, change),
                    headers={"content-type": "application/x-tar"})
        assert r.status_code == 422, r.text
        assert tensor in r.json()["error"]["message"]
        assert op.get(f"/tasks/{name}").status_code == 404
        assert name not in [t["name"] for t in op.get("/tasks").json()["tasks"]]


def test_a_failing_task_fails_only_its_own_requests(tmp_path: Path) -> None:
    model = load_backbone(None)
    builtin = imagenet_task(model)
    store = TaskStore.for_model(tmp_path / "store", model)
    runtime = TaskRuntime(model, store, builtin={"imagenet": (builtin, 64)})
    try:
        runtime.load_builtins()
        # A task that slipped past every check (here registered on the chip directly):
        # its head's bias is half precision, so its part of a batch raises.
        head = builtin.head
        poisoned = TaskState("poisoned", builtin.shift_levels,
                             TaskHead(head.weight, head.bias.half(), head.labels))
        runtime.engine.add_task(poisoned)
        runtime.served["poisoned"] = dataclasses.replace(
            runtime.served["imagenet"], name="poisoned", builtin=False)
        assert isinstance(runtime.served["poisoned"], ServedTask)
        x = torch.rand(3, 64, 64)
        items = [BatchItem(t, x, Fidelity.IDEAL, 3)
                 for t in ("imagenet", "poisoned", "imagenet", "poisoned")]
        results = runtime.worker.submit(runtime.infer_batch, items).result()
        good, bad = results[0::2], results[1::2]
        assert all(isinstance(r, Prediction) and r.task == "imagenet" for r in good), good
        assert all(isinstance(r, ChipFailure) and r.task == "poisoned" for r in bad), bad
        assert all(http_answer(r).status == 500 for r in bad)
        assert good[0].top == good[1].top  # (the same image)
        alone = runtime.worker.submit(runtime.infer_batch, items[:1]).result()[0]
        assert isinstance(alone, Prediction)
        assert [label for label, _ in alone.top] == [label for label, _ in good[0].top]
    finally:
        runtime.close()
        store.close()
