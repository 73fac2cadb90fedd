from __future__ import annotations

import json
import math

import pytest
import torch

from core.task_state import TaskState, random_head
from task_store.errors import FormatError
from task_store.format import (
    SCHEMA_VERSION,
    Manifest,
    build_manifest,
    code_bits,
    decode_task,
    encode_task,
    pack_uint,
    packed_bytes,
    unpack_uint,
)
from tests.task_store.helpers import (
    FINGERPRINT,
    METHOD_SHAPES,
    assert_same_task,
    method_task,
    tiny_mapping,
    with_shift_levels,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_round_trip(bits: int, count: int) -> None:
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_uint(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_uint(packed, bits, count), values)


def test_pack_layout_is_lsb_first() -> None:
    # 3-bit values 1, 2, 3 -> stream bits 100 010 110 -> byte0 = 0b11010001, byte1 = 0b0
    assert pack_uint(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    assert pack_uint(torch.tensor([0x3, 0xA, 0x5]), 4).tolist() == [0xA3, 0x05]
    with pytest.raises(FormatError):
        pack_uint(torch.tensor([8]), 3)
    with pytest.raises(FormatError):
        unpack_uint(torch.zeros(2, dtype=torch.uint8), 3, 9)


def test_code_bits_follow_the_level_count() -> None:
    assert [code_bits(n) for n in range(8)] == [1, 2, 2, 3, 3, 3, 3, 4]


@pytest.mark.parametrize("shift_levels", [0, 1, 2, 3])
@pytest.mark.parametrize("method", sorted(METHOD_SHAPES))
def test_encode_decode_is_bit_identical(method: str, shift_levels: int) -> None:
    mapping = with_shift_levels(tiny_mapping(), shift_levels)
    digital = {"bn.weight": torch.rand(6), "bn.running_var": torch.rand(6, dtype=torch.float64)}
    task = method_task("t", mapping, method, seed=shift_levels, digital=digital)
    task.validate(mapping)
    encoded = encode_task(task, {m.name: m.weight_bits for m in mapping.layers})
    manifest = build_manifest(encoded, task, version=1, method=method,
                              backbone_fingerprint=FINGERPRINT)
    back = decode_task(encoded.data, Manifest.from_json(manifest.to_json()))
    assert_same_task(task, back)
    assert encode_task(back, {m.name: m.weight_bits for m in mapping.layers}).data == encoded.data


def test_sizes_follow_the_documented_packing() -> None:
    mapping = tiny_mapping()
    task = method_task("t", mapping, "fine_tuning")
    encoded = encode_task(task, {m.name: m.weight_bits for m in mapping.layers})
    # every PE replaced: stem 6 PEs x 2 outputs x 18 rows at 8 bits, block 6 x 4 x 18 at 4 bits
    assert encoded.sizes["spare_codes"] == 6 * 2 * 18 + 6 * 4 * 18 // 2
    # 6 PEs per layer -> 1 byte of PE mask per layer
    assert encoded.sizes["pe_mask"] == 2
    # 2 row groups x Cout logical columns, 3 bits at N = 3, per layer rounded up to bytes
    assert encoded.sizes["column_codes"] == packed_bytes(2 * 6, 3) + packed_bytes(2 * 9, 3)
    assert encoded.sizes["head"] == (3 * 16 + 3) * 4
    assert encoded.sizes["tensors_file"] == len(encoded.data)
    # without the mapping a layer is packed at the fewest bits (>= 4) its codes need
    assert [r.weight_bits for r in encode_task(task).layers] == [4, 8]  # block.conv, stem


def test_manifest_round_trip_and_refusals() -> None:
    mapping = tiny_mapping()
    task = method_task("flowers", mapping, "xma2")
    encoded = encode_task(task)
    manifest = build_manifest(encoded, task, version=3, method="xma2",
                              backbone_fingerprint=FINGERPRINT,
                              hyperparameters={"pe_fraction": 0.1, "epochs": 5},
                              metrics={"accuracy": 0.91, "energy_j": 1.5e-6})
    back = Manifest.from_json(manifest.to_json())
    assert back == manifest
    data = json.loads(manifest.to_json())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["files"]["task.safetensors"]["sha256"] == encoded.sha256
    for change, message in [
        ({"schema_version": SCHEMA_VERSION + 1}, "schema version"),
        ({"task": "../etc"}, "invalid task name"),
        ({"files": {"../x": {"sha256": "0" * 64, "bytes": 1}}}, "unexpected file"),
        ({"version": "3"}, "wrong type"),
        ({"metrics": {"accuracy": "high"}}, "numbers"),
    ]:
        with pytest.raises(FormatError, match=message):
            Manifest.from_json(json.dumps({**data, **change}).encode())
    with pytest.raises(FormatError, match="JSON"):
        Manifest.from_json(b"\x80not json")


def test_decode_refuses_files_that_disagree_with_the_manifest() -> None:
    mapping = tiny_mapping()
    task = method_task("t", mapping, "xma2", seed=4)
    other = method_task("t", mapping, "fine_tuning", seed=4)
    manifest = build_manifest(encode_task(task), task, version=1, method="xma2",
                              backbone_fingerprint=FINGERPRINT)
    with pytest.raises(FormatError):
        decode_task(encode_task(other).data, manifest)
    with pytest.raises(FormatError, match="tensor file"):
        decode_task(b"\x10" + b"\0" * 7 + b"{}" + b"\0" * 14, manifest)
    empty = TaskState("empty", 3, random_head(2, 4))
    assert decode_task(encode_task(empty).data,
                       build_manifest(encode_task(empty), empty, version=1, method="none",
                                      backbone_fingerprint=FINGERPRINT)).layers == {}
