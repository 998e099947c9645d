"""``medfedpure serve``: the HTTP service, tested against a real uvicorn process on a free loopback port.

The service's answers are compared with :meth:`Defender.run` on the same bytes and seed in this
process (identical label, score, t*, probabilities); errors are checked for their HTTP code and
typed body; concurrent requests must each get their own seed's answer. A few cases that need a
broken Defender (500, unverified) use the same application in-process through Starlette's client.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom.data
import pytest
from fastapi.testclient import TestClient
from medfedpure.runtime.defender import Defender
from medfedpure.runtime.network import is_loopback
from medfedpure.runtime.signing import key_id
from medfedpure.serve.app import create_app, self_test_scan
from medfedpure.serve.config import ServeConfig
from PIL import Image
from signing_keys import TEST_KEY
from tiny_bundle import cached_tiny_bundle, tiny_scans

MAX_BYTES = 64 * 1024
ROOT = Path(__file__).resolve().parents[1]


def _png(i: int) -> bytes:
    x = tiny_scans(i + 1, seed=7)[i, 0]
    buf = io.BytesIO()
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dicom() -> bytes:
    return Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def defender(tiny: Path):
    d = Defender.load(tiny)
    yield d
    d.close()


@pytest.fixture(scope="module")
def server_audit(tmp_path_factory) -> Path:
    """The ``--audit`` file of the shared ``server`` process."""
    return tmp_path_factory.mktemp("serve-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(tiny: Path, server_audit: Path):
    """A real ``medfedpure serve`` process on a free loopback port; always terminated afterwards."""
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "medfedpure", "serve", "--port", str(port), "--bundle", str(tiny),
                             "--max-bytes", str(MAX_BYTES), "--audit", str(server_audit)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"medfedpure serve exited with {proc.returncode}:\n{output()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"medfedpure serve not ready after 90 s:\n{output()}")
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client, proc, output
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _same(body: dict, r) -> None:
    """The service's JSON equals the in-process Result on everything the decision consists of."""
    assert body["status"] == r.status == "ok"
    assert body["label"] == r.label
    assert body["score"] == r.score
    assert body["t_star"] == r.t_star
    assert body["flagged"] == r.flagged
    assert body["probabilities"] == r.probabilities
    assert body["seed"] == r.seed
    assert body["bundle_id"] == r.bundle_id


def _error(resp: httpx.Response, status: int, type_name: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_name
    assert "Traceback" not in resp.text
    return body["error"]["message"]


# --- the real process --------------------------------------------------------------------------
def test_healthz_ready_after_self_test(server, defender) -> None:
    client, _, _ = server
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["live"] is True and body["ready"] is True
    assert body["bundle_id"] == defender.bundle.bundle_id
    st = defender.run(self_test_scan(defender.image_size), seed=0)
    assert body["self_test"]["status"] == "ok" and body["self_test"]["label"] == st.label


def test_classify_png_matches_defender(server, defender) -> None:
    client, _, _ = server
    data = _png(0)
    resp = client.post("/v1/classify", params={"seed": 11}, content=data, headers={"Content-Type": "image/png"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    _same(body, defender.run(data, seed=11))
    assert body["medfedpure_version"] == "0.1.0" and body["policy"] == "adaptive"
    assert "purified" not in body and "patch_error" not in body  # no pixel arrays unless asked


def test_classify_dicom_matches_defender(server, defender) -> None:
    client, _, _ = server
    data = _dicom()
    expected = defender.run(data, seed=5)
    for ctype in ("application/dicom", "application/octet-stream"):  # declared, and sniffed
        resp = client.post("/v1/classify?seed=5", content=data, headers={"Content-Type": ctype})
        assert resp.status_code == 200, resp.text
        _same(resp.json(), expected)


def test_classify_arrays_on_request(server, defender) -> None:
    client, _, _ = server
    data = _png(1)
    resp = client.post("/v1/classify", params={"seed": 3, "return_purified": "true", "return_patch_error": "true"},
                       content=data, headers={"Content-Type": "image/png"})
    body = resp.json()
    r = defender.run(data, seed=3, return_purified=True, return_patch_error=True)
    s = defender.image_size
    assert np.asarray(body["purified"], dtype=np.float32).shape == (1, s, s)
    np.testing.assert_array_equal(np.asarray(body["purified"], dtype=np.float32), r.purified)
    np.testing.assert_array_equal(np.asarray(body["patch_error"], dtype=np.float32), r.patch_error)


def test_policy_per_request(server, defender) -> None:
    client, _, _ = server
    t_min = defender.engine.gate_spec.t_min
    data = _dicom()
    assert defender.run(data, seed=1).t_star == 0  # a scan that the adaptive policy lets skip the purifier
    resp = client.post("/v1/classify", params={"seed": 1, "policy": "floor"}, content=data,
                       headers={"Content-Type": "application/dicom"})
    body = resp.json()
    assert body["policy"] == "floor" and body["t_star"] >= t_min > 0
    _same(body, defender.run(data, seed=1, policy="floor"))
    assert client.post("/v1/classify?seed=1", content=data).json()["t_star"] == 0  # the service's default


def test_concurrent_requests_get_their_own_seed(server, defender) -> None:
    client, _, _ = server
    data = _png(2)
    seeds = list(range(100, 108))
    expected = {s: defender.run(data, seed=s, policy="floor") for s in seeds}  # floor: every scan purified

    def one(s: int) -> dict:
        return client.post("/v1/classify", params={"seed": s, "policy": "floor"}, content=data,
                           headers={"Content-Type": "image/png"}).json()

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(seeds, pool.map(one, seeds), strict=True))
    for s in seeds:
        _same(got[s], expected[s])
    # the seed changes the answer, so a mixed-up reply would have been caught
    assert len({tuple(got[s]["probabilities"].values()) for s in seeds}) > 1


def test_bad_scans_are_400(server) -> None:
    client, _, _ = server
    msg = _error(client.post("/v1/classify", content=b"not an image at all",
                             headers={"Content-Type": "application/octet-stream"}), 400, "ScanNotImageError")
    assert "supported formats" in msg
    _error(client.post("/v1/classify", content=b"", headers={"Content-Type": "image/png"}), 400, "ScanEmptyError")
    truncated = _png(0)[:60]
    resp = client.post("/v1/classify", content=truncated, headers={"Content-Type": "image/png"})
    assert resp.status_code == 400 and resp.json()["error"]["type"].startswith("Scan")


def test_too_large_is_413(server) -> None:
    client, _, _ = server
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES)
    msg = _error(client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"}),
                 413, "ScanTooLargeError")
    assert f"{MAX_BYTES:,}" in msg and "--max-bytes" in msg

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(4):
            yield bytes(MAX_BYTES // 2)

    msg = _error(client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/octet-stream"}),
                 413, "ScanTooLargeError")
    assert "while streaming" in msg
    # a body exactly at the limit is read (and then refused as a scan, not for its size)
    resp = client.post("/v1/classify", content=bytes(MAX_BYTES), headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 400


def test_unsupported_media_type_is_415(server) -> None:
    client, _, _ = server
    png = _png(0)
    msg = _error(client.post("/v1/classify", content=png, headers={"Content-Type": "text/plain"}),
                 415, "UnsupportedMediaTypeError")
    assert "image/png" in msg
    msg = _error(client.post("/v1/classify", content=_dicom(), headers={"Content-Type": "image/png"}),
                 415, "UnsupportedMediaTypeError")
    assert "PNG signature" in msg
    _error(client.post("/v1/classify", content=png, headers={"Content-Type": "image/jpeg"}),
           415, "UnsupportedMediaTypeError")
    _error(client.post("/v1/classify", content=png, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}),
           415, "UnsupportedMediaTypeError")


@pytest.mark.parametrize("params, word", [({"policy": "strict"}, "adaptive or floor"), ({"seed": -1}, "seed"),
                                          ({"seed": "abc"}, "seed"), ({"seed": 2**63}, "seed")])
def test_bad_parameters_are_422(server, params, word) -> None:
    client, _, _ = server
    msg = _error(client.post("/v1/classify", params=params, content=_png(0), headers={"Content-Type": "image/png"}),
                 422, "BadParameterError")
    assert word in msg


def test_bundle_endpoint(server, defender) -> None:
    client, _, _ = server
    body = client.get("/v1/bundle").json()
    vb, g = defender.bundle, defender.bundle.spec.gate
    assert body["bundle_id"] == vb.bundle_id
    assert body["classes"] == ["no_tumor", "tumor"] and body["image_size"] == 32
    assert body["gate_statistic"] == g.to_dict()["stat"] and body["tau"] == g.tau
    assert body["policy"] == "adaptive" and body["t_star_range"] == [g.t_min, g.t_max]
    assert body["purifier_steps"] == vb.spec.purifier.steps == 2
    assert body["signer"] == {"key_id": key_id(TEST_KEY.public_key()), "name": "medfedpure-test"}
    assert body["provenance"]["run"] == "tiny-random"
    assert str(vb.root) not in client.get("/v1/bundle").text  # no paths


def test_real_service_appends_one_audit_record_per_answer(server, server_audit: Path, defender) -> None:
    """The real process with --audit: one record per answered request, a decision and a refusal."""
    client, _, _ = server
    before = server_audit.read_text().splitlines()
    data = _png(3)
    body = client.post("/v1/classify", params={"seed": 21}, content=data, headers={"Content-Type": "image/png"}).json()
    _error(client.post("/v1/classify", content=b"not a scan"), 400, "ScanNotImageError")
    new = [json.loads(line) for line in server_audit.read_text().splitlines()[len(before):]]
    assert [(r["status"], r["error"]) for r in new] == [("ok", None), ("refused", "ScanNotImageError")]
    r = defender.run(data, seed=21)
    for k in ("label", "probabilities", "bundle_id", "pixel_sha256", "seed", "t_star", "score"):
        assert new[0][k] == body[k] == getattr(r, k), k


def test_unknown_route_and_method_are_typed(server) -> None:
    client, _, _ = server
    _error(client.get("/v1/nothing"), 404, "NotFoundError")
    _error(client.get("/v1/classify"), 405, "MethodNotAllowedError")


def test_loopback_only_by_default(tiny: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    out = subprocess.run([sys.executable, "-m", "medfedpure", "serve", "--host", "0.0.0.0", "--bundle", str(tiny)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--allow-remote" in out.stderr


def test_shutdown_is_clean(server) -> None:
    """SIGTERM: a graceful shutdown through the lifespan, which closes the Defender (runs last on the shared
    server). uvicorn re-raises the signal once shut down, so the exit status is 0 or -SIGTERM."""
    _, proc, output = server
    proc.terminate()
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in output()


# --- in-process: failures that need a broken Defender ------------------------------------------
def _client_with(tiny: Path, breaker) -> TestClient:
    def factory(cfg: ServeConfig) -> Defender:
        d = Defender.load(tiny)
        breaker(d)
        return d

    return TestClient(create_app(ServeConfig(bundle=str(tiny)), defender_factory=factory),
                      raise_server_exceptions=False)


def test_unverified_is_200_without_label(tiny: Path) -> None:
    def boom(*a, **k):
        raise RuntimeError("classifier exploded")

    with _client_with(tiny, lambda d: setattr(d.engine, "classify", boom)) as c:
        assert c.get("/healthz").status_code == 503  # the self-test was not verified: not ready
        resp = c.post("/v1/classify?seed=2", content=_png(0), headers={"Content-Type": "image/png"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "unverified" and body["label"] is None and body["probabilities"] == {}
    assert "classify failed" in body["reason"]


def test_internal_error_is_500_without_traceback(tiny: Path) -> None:
    def broken_run(*a, **k):
        raise RuntimeError("secret internal detail")

    with _client_with(tiny, lambda d: setattr(d, "run", broken_run)) as c:
        resp = c.post("/v1/classify?seed=2", content=_png(0), headers={"Content-Type": "image/png"})
    msg = _error(resp, 500, "InternalError")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text and "server log" in msg


def test_defender_run_policy_is_per_call(defender) -> None:
    data = _dicom()
    assert defender.run(data, seed=1).t_star == 0
    r = defender.run(data, seed=1, policy="floor")
    assert r.t_star >= defender.engine.gate_spec.t_min > 0 and defender.policy == "adaptive"
    assert defender.run(data, seed=1).t_star == 0  # the Defender itself is unchanged
    with pytest.raises(ValueError, match="policy='x'"):
        defender.run(data, seed=1, policy="x")


@pytest.mark.parametrize("kw, word", [({"policy": "x"}, "policy"), ({"max_bytes": 0}, "max_bytes"),
                                      ({"backend": "cuda"}, "backend"), ({"max_concurrent": 0}, "max_concurrent"),
                                      ({"timeout_s": 0}, "timeout_s")])
def test_serve_config_refuses_bad_values(kw, word) -> None:
    with pytest.raises(ValueError, match=word):
        ServeConfig(**kw)


def test_serve_config_round_trips_through_env() -> None:
    cfg = ServeConfig(bundle="/b", policy="floor", max_bytes=1000, trusted_keys=("k.pem",))
    assert ServeConfig.from_env({"MEDFEDPURE_SERVE_CONFIG": cfg.to_env()}) == cfg


def test_serves_without_torch(tiny: Path) -> None:
    """The core install has no torch: the CLI and the service import, start and classify with torch blocked."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
import medfedpure.cli
from fastapi.testclient import TestClient
from medfedpure.serve.app import create_app
from medfedpure.serve.config import ServeConfig
with TestClient(create_app(ServeConfig(bundle={str(tiny)!r}))) as c:
    assert c.get("/healthz").status_code == 200
    r = c.post("/v1/classify?seed=4", content=open({pydicom.data.get_testdata_file("MR_small.dcm")!r}, "rb").read())
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
assert "torch" not in sys.modules
print("served without torch")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "served without torch" in out.stdout


# --- audit records (--audit) -------------------------------------------------------------------
def _audited(tiny: Path, path: Path | str, **kw) -> TestClient:
    return TestClient(create_app(ServeConfig(bundle=str(tiny), audit=str(path), **kw)), raise_server_exceptions=False)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _nearly_constant_png() -> bytes:
    """Decodes (one pixel differs), then is refused by preprocessing: no robust contrast."""
    x = np.full((32, 32), 128, np.uint8)
    x[0, 0] = 200
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_appends_one_audit_record(tiny: Path, defender, tmp_path: Path) -> None:
    """One record per decision, the one ``run --audit`` writes for the same Result (no source path)."""
    from medfedpure.runtime.audit import AuditFileHandler, audit_record

    audit = tmp_path / "audit.jsonl"
    data = _png(0)
    with _audited(tiny, audit) as c:
        body = c.post("/v1/classify?seed=11", content=data, headers={"Content-Type": "image/png"}).json()
        assert len(_records(audit)) == 1  # written before the answer left
    (rec,) = _records(audit)
    r = defender.run(data, seed=11)
    for k in ("label", "probabilities", "bundle_id", "pixel_sha256", "seed", "score", "t_star", "flagged"):
        assert rec[k] == body[k] == getattr(r, k), k
    expected = audit_record(r, defender)
    assert {k: v for k, v in rec.items() if k not in ("timestamp", "latency_ms")} == \
           {k: v for k, v in expected.items() if k not in ("timestamp", "latency_ms")}
    assert "source" not in rec and rec["status"] == "ok" and rec["policy"] == "adaptive"
    assert not [h for h in logging.getLogger("medfedpure").handlers if isinstance(h, AuditFileHandler)]


def test_every_refusal_appends_one_refused_record(tiny: Path, defender, tmp_path: Path) -> None:
    from medfedpure.scan import load_scan

    audit = tmp_path / "audit.jsonl"
    constant = _nearly_constant_png()
    with _audited(tiny, audit, max_bytes=MAX_BYTES) as c:
        _error(c.post("/v1/classify?seed=5", content=b"not an image at all"), 400, "ScanNotImageError")
        _error(c.post("/v1/classify?seed=6", content=constant, headers={"Content-Type": "image/png"}),
               400, "ScanConstantError")
        _error(c.post("/v1/classify", content=b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES),
                      headers={"Content-Type": "image/png"}), 413, "ScanTooLargeError")
        _error(c.post("/v1/classify", content=_png(0), headers={"Content-Type": "text/plain"}),
               415, "UnsupportedMediaTypeError")
        _error(c.post("/v1/classify?policy=strict", content=_png(0)), 422, "BadParameterError")
        _error(c.post("/v1/classify?seed=-1", content=_png(0)), 422, "BadParameterError")
        _error(c.get("/v1/classify"), 405, "MethodNotAllowedError")  # not a classification: no record
    recs = _records(audit)
    assert [r["error"] for r in recs] == ["ScanNotImageError", "ScanConstantError", "ScanTooLargeError",
                                          "UnsupportedMediaTypeError", "BadParameterError", "BadParameterError"]
    assert {r["status"] for r in recs} == {"refused"}
    assert all(r["label"] is None and r["probabilities"] == {} for r in recs)
    assert [r["seed"] for r in recs[:2]] == [5, 6]
    assert recs[0]["pixel_sha256"] is None  # refused before decoding
    # refused after decoding: the record run --audit writes (run_batch), with the decoded pixels' hash
    assert recs[1]["pixel_sha256"] == load_scan(constant).sha256
    assert recs[1]["scope"] is not None and recs[1]["scope"]["override"] is False
    assert "policy='strict'" in recs[4]["reason"] and "seed" in recs[5]["reason"]


def test_out_of_scope_and_unverified_are_recorded(tiny: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()

    def boom(*a, **k):
        raise RuntimeError("classifier exploded")

    with _audited(tiny, audit) as c:
        body = c.post("/v1/classify?seed=8", content=ct).json()
    assert body["status"] == "out_of_scope"
    with _client_with(tiny, lambda d: setattr(d.engine, "classify", boom)) as c:  # no --audit: nothing kept
        assert c.post("/v1/classify?seed=2", content=_png(0)).json()["status"] == "unverified"
    (rec,) = _records(audit)
    assert rec["status"] == "out_of_scope" and rec["seed"] == 8 and rec["pixel_sha256"] == body["pixel_sha256"]
    assert rec["dicom"]["sop_uid"] == body["dicom_uids"]["sop"]


def test_replay_reproduces_a_service_record(tiny: Path, tmp_path: Path) -> None:
    from medfedpure.cli import app
    from typer.testing import CliRunner

    audit, scan = tmp_path / "audit.jsonl", tmp_path / "scan.png"
    scan.write_bytes(_png(1))
    with _audited(tiny, audit, policy="floor") as c:
        assert c.post("/v1/classify?seed=31", content=scan.read_bytes()).status_code == 200
        assert c.post("/v1/classify?seed=32", content=_dicom()).status_code == 200
    res = CliRunner().invoke(app, ["replay", str(audit), "--line", "1", "--scan", str(scan), "--bundle", str(tiny),
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["identical"] is True and out["fields"]["seed"]["replayed"] == 31
    assert out["fields"]["policy"]["replayed"] == "floor"
    # the other record is not this scan's: refused by pixel sha256 before any model runs
    res = CliRunner().invoke(app, ["replay", str(audit), "--line", "2", "--scan", str(scan), "--bundle", str(tiny)])
    assert res.exit_code == 2 and "pixel sha256 mismatch" in res.output


def test_unwritable_audit_file_fails_the_request(tiny: Path) -> None:
    """A record that cannot be written (/dev/full: every write is ENOSPC): the decision is withheld, 500."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with _audited(tiny, "/dev/full") as c:
        resp = c.post("/v1/classify?seed=2", content=_png(0), headers={"Content-Type": "image/png"})
        refused = c.post("/v1/classify", content=b"junk")
    msg = _error(resp, 500, "AuditUnavailableError")
    assert "audit file" in msg and "label" not in resp.text
    _error(refused, 500, "AuditUnavailableError")


def test_unopenable_audit_file_stops_the_start(tiny: Path, tmp_path: Path) -> None:
    dangling = tmp_path / "audit.jsonl"
    dangling.symlink_to(tmp_path / "missing" / "audit.jsonl")  # its folder exists; the target's does not
    with pytest.raises(FileNotFoundError):
        with _audited(tiny, dangling):
            pass
    out = subprocess.run([sys.executable, "-m", "medfedpure", "serve", "--bundle", str(tiny), "--audit", str(dangling)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert str(dangling) in out.stderr and "cannot be opened for appending" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("name, word", [("", "folder"), ("missing/audit.jsonl", "does not exist")])
def test_serve_config_refuses_bad_audit_paths(tmp_path: Path, name: str, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        ServeConfig(audit=str(tmp_path / name) if name else str(tmp_path))


def test_serve_config_audit_is_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig(audit="audit.jsonl")
    assert cfg.audit == str(tmp_path / "audit.jsonl")
    assert ServeConfig.from_env({"MEDFEDPURE_SERVE_CONFIG": cfg.to_env()}) == cfg


def test_audit_handler_writes_each_record_in_one_append_write(tmp_path: Path, monkeypatch) -> None:
    """One ``os.write`` per record, newline included, on an ``O_APPEND`` descriptor (records larger than any
    stream buffer included): what keeps the records of several processes whole."""
    import fcntl

    from medfedpure.runtime.audit import audit_file_handler, log_audit

    path = tmp_path / "a.jsonl"
    path.write_text("")
    handler = audit_file_handler(path)
    calls: list[tuple[int, bytes]] = []
    real_write = os.write

    def spy(fd: int, data) -> int:
        calls.append((fd, bytes(data)))
        return real_write(fd, data)

    log = logging.getLogger("medfedpure")
    audit_log = logging.getLogger("medfedpure.audit")
    old = audit_log.level
    log.addHandler(handler)
    audit_log.setLevel(logging.INFO)
    monkeypatch.setattr(os, "write", spy)
    try:
        records = [{"i": i, "pad": "x" * n} for i, n in enumerate((10, 20_000, 70_000))]
        for rec in records:
            log_audit(rec)
        assert fcntl.fcntl(handler.fd, fcntl.F_GETFL) & os.O_APPEND
    finally:
        monkeypatch.undo()
        log.removeHandler(handler)
        audit_log.setLevel(old)
        handler.close()
    mine = [data for fd, data in calls if fd == handler.fd or data.startswith(b'{"i"')]
    assert [json.loads(d) for d in mine] == records and all(d.endswith(b"\n") and d.count(b"\n") == 1 for d in mine)
    assert _records(path) == records


def test_strict_audit_handler_raises_on_a_failed_write() -> None:
    from medfedpure.runtime.audit import AuditWriteError, audit_file_handler, log_audit

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    log = logging.Logger("strict-test")  # a private logger: nothing else sees these records
    for strict in (True, False):
        handler = audit_file_handler("/dev/full", strict=strict)
        handler.handleError = lambda record: None  # the non-strict report (stderr) is not this test's subject
        log.handlers = [handler]
        try:
            if strict:
                with pytest.raises(AuditWriteError) as ei:
                    log_audit({"schema_version": 1}, logger=log)
                assert ei.value.errno == errno.ENOSPC and "/dev/full" in str(ei.value)
            else:
                log_audit({"schema_version": 1}, logger=log)  # reported by logging, not raised
        finally:
            handler.close()


_APPENDER = """
import logging, pathlib, sys, time
from medfedpure.runtime.audit import audit_file_handler, log_audit
path, who, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
logging.getLogger("medfedpure").addHandler(audit_file_handler(path))
logging.getLogger("medfedpure.audit").setLevel(logging.INFO)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
for i in range(200):
    log_audit({"who": who, "i": i, "pad": who * (1000 + 97 * i)})
"""


def test_two_processes_append_whole_records(tmp_path: Path) -> None:
    """Two processes appending 200 records each (1 to 20 KiB, past the pipe and stream buffers) to one
    file: 400 intact JSON lines, as the workers of ``serve --workers 2`` do."""
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), who, str(go)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for who in ("a", "b")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
    recs = _records(path)
    assert len(recs) == 400
    assert sorted((r["who"], r["i"]) for r in recs) == [(w, i) for w in ("a", "b") for i in range(200)]
    assert all(r["pad"] == r["who"] * (1000 + 97 * r["i"]) for r in recs)


def test_real_service_logs_why_a_record_was_not_written(tiny: Path) -> None:
    """With --audit the service's own errors still reach stderr (the audit handler on the ``medfedpure``
    logger would otherwise end logging's last-resort output): a failed write is answered 500 and logged."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medfedpure", "serve", "--port", str(port), "--bundle", str(tiny),
                             "--audit", "/dev/full"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "medfedpure serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/classify?seed=1", content=_dicom(), timeout=60)
        _error(resp, 500, "AuditUnavailableError")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "audit record could not be written" in out and "No space left on device" in out, out
