"""Hostile and malformed requests get a 4xx in the one error shape, are counted by their
real status, and never leak the store's path or the API key."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.live import LiveServer, photo_dataset, tar_bytes

BIG = 2**63  # one past SQLite's largest integer
BROKEN_MULTIPART = b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n"  # no name


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == status, body
    return body["error"]["message"]


def test_integers_beyond_the_index_are_refused(server: LiveServer) -> None:
    with server.operator() as op:
        for r in (op.post("/tasks/mnist/activate", params={"version": BIG}),
                  op.get("/tasks/mnist/archive", params={"version": BIG}),
                  op.delete("/tasks/mnist", params={"version": BIG}),
                  op.get("/adaptations/job-x/events", params={"after": BIG})):
            assert "version" in _error(r, 422) or "after" in r.text
        assert op.get("/tasks/mnist").json()["version"] == 1


def test_dataset_paths_that_cannot_be_resolved_get_4xx(server: LiveServer) -> None:
    loop = server.data_root / "loop"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    body = {"task": "never", "method": "xma2"}
    with server.operator() as op:
        for layout in ({}, {"dataset": "flowers102"}):  # an image folder, a published layout
            for path in ("bad\x00name", "x" * 5000, "loop", "loop/inner"):
                r = op.post("/adaptations", json={**body, **layout, "dataset_path": path})
                assert r.status_code in (403, 422), (layout, path[:20], r.text)
                _error(r, r.status_code)
        assert all(j["task"] != "never" for j in op.get("/adaptations").json()["data"])


def test_seed_and_numbers_are_checked_strictly(server: LiveServer) -> None:
    base = {"task": "strict", "dataset": "digits", "epochs": 1, "train_limit": 10,
            "test_limit": 10}
    with server.operator() as op:
        for change in ({"seed": 2**32}, {"epochs": "3"}, {"epochs": True},
                       {"image_size": 64.5}, {"activate": "yes"}):
            r = op.post("/adaptations", json={**base, **change})
            message = _error(r, 422)
            assert next(iter(change)) in message, message
        assert all(j["task"] != "strict" for j in op.get("/adaptations").json()["data"])


def _archive(op: httpx.Client, change: str) -> bytes:
    """The exported mnist archive with its manifest text edited by ``change``."""
    data = op.get("/tasks/mnist/archive").content
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            stream = tar.extractfile(member)
            assert stream is not None
            members[member.name] = stream.read()
    manifest = json.loads(members["manifest.json"])
    if change == "nan":
        text = json.dumps({**manifest, "metrics": {"test_accuracy": float("nan")}})
    elif change == "inf":
        text = json.dumps(manifest).replace('"metrics": {', '"metrics": {"x": 1e999, ', 1)
    else:  # nested deeper than any parser's recursion limit
        text = json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    members["manifest.json"] = text.encode()
    return tar_bytes(members)


@pytest.mark.parametrize("change", ["nan", "inf", "deep"])
def test_hostile_manifests_are_refused(server: LiveServer, change: str) -> None:
    with server.operator() as op:
        body = _archive(op, change)
        r = op.post("/tasks", params={"name": f"hostile-{change}"}, content=body,
                    headers={"content-type": "application/x-tar"})
        message = _error(r, 422)
        assert "manifest" in message and str(server.store) not in message
        assert op.get(f"/tasks/hostile-{change}").status_code == 404


def test_store_path_never_shows_in_errors(server: LiveServer) -> None:
    with server.operator() as op:
        r = op.post("/tasks", content=b"not a tar at all" * 10,
                    headers={"content-type": "application/x-tar"})
    message = _error(r, 422)
    assert str(server.store) not in message and str(server.root) not in message


def _count(c: httpx.Client, status: str) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("xma2_requests_total{") and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_refusals_are_counted_by_their_status(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(300):
            yield b"\0" * 10_000  # 3 MB, over the server's 2 MB limit, with no length

    with server.client() as c:
        before = {s: _count(c, s) for s in ("400", "413", "500")}
        r = c.post("/predict", params={"task": "mnist"}, content=chunks(),
                   headers={"content-type": "image/png"})
        _error(r, 413)
        r = c.post("/predict", params={"task": "mnist"}, content=BROKEN_MULTIPART,
                   headers={"content-type": "multipart/form-data; boundary=x"})
        _error(r, 400)
        after = {s: _count(c, s) for s in ("400", "413", "500")}
    assert after["413"] == before["413"] + 1
    assert after["400"] == before["400"] + 1
    assert after["500"] == before["500"]


def test_every_refusal_has_the_error_shape(server: LiveServer) -> None:
    with server.operator() as op:
        _error(op.get("/no/such/path"), 404)
        r = op.put("/tasks")
        _error(r, 405)
        assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
        _error(op.post("/adaptations", content=b"{not json",
                       headers={"content-type": "application/json"}), 422)
        _error(op.post("/tasks", content=BROKEN_MULTIPART,
                       headers={"content-type": "multipart/form-data; boundary=x"}), 400)


def test_openapi_states_what_the_server_checks(server: LiveServer) -> None:
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    predict = doc["paths"]["/predict"]["post"]
    assert "security" not in predict  # /predict needs no key unless configured
    assert doc["paths"]["/tasks"]["get"]["security"]
    name = next(p for p in doc["paths"]["/tasks"]["post"]["parameters"] if p["name"] == "name")
    assert "pattern" in json.dumps(name["schema"])
    request = doc["components"]["schemas"]["AdaptationRequest"]
    assert len(request["oneOf"]) == 3  # a built-in dataset, an image folder, a layout + path
    layout = next(b for b in request["oneOf"] if len(b["required"]) == 2)
    assert set(layout["required"]) == {"dataset", "dataset_path"}
    assert "flowers102" in layout["properties"]["dataset"]["enum"]
    assert request["properties"]["seed"]["maximum"] == 2**32 - 1
    with server.client() as c:
        page = c.get("/docs").text
    assert "validatorUrl" in page and '"validatorUrl": null' in page.replace("'", '"')


def test_the_api_key_never_reaches_the_access_log(server: LiveServer) -> None:
    with server.client() as c:
        c.get("/tasks", params={"api_key": server.api_key, "token": "tok-123456"})
        c.get("/healthz", params={"key": server.api_key})
    log = server.log_path.read_text(errors="replace")
    assert "/healthz?key=***" in log
    assert server.api_key not in log and "tok-123456" not in log


def test_a_class_folder_linking_outside_the_data_root_is_refused(server: LiveServer,
                                                                 tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "secretclass"
    photo_dataset(outside.parent, {"secretclass": "coffee"}, per_class=2)
    escape = server.data_root / "escape"
    photo_dataset(escape, {"inside": "chelsea"}, per_class=2)
    (escape / "secret").symlink_to(outside, target_is_directory=True)
    inner = server.data_root / "inner-link"
    photo_dataset(inner, {"cats": "chelsea"}, per_class=2)
    (inner / "cats" / "stolen.png").symlink_to(next(outside.iterdir()))
    with server.operator() as op:
        for folder in ("escape", "inner-link"):
            r = op.post("/adaptations", json={"task": "escape", "dataset_path": folder,
                                               "epochs": 1})
            message = _error(r, 403)
            assert "outside the data root" in message and str(outside) not in message
        assert all(j["task"] != "escape" for j in op.get("/adaptations").json()["data"])
