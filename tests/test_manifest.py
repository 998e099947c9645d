"""The manifest's typed sections: parsed once, validated field by field, unimplemented parts refused;
format-1 bundles refused and converted without changing a weight."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from medfedpure.runtime.bundle import BundleError, verify_bundle
from medfedpure.runtime.manifest import (
    FORMAT_VERSION,
    BundleSpec,
    MaeSpec,
    Preprocessing,
    PurifierSpec,
    decode_masks,
    encode_masks,
)
from tiny_bundle import cached_tiny_bundle


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((cached_tiny_bundle() / "manifest.json").read_text())


def _parse(m: dict) -> BundleSpec:
    return BundleSpec.from_manifest(m)


def test_sections_round_trip(manifest: dict) -> None:
    spec = _parse(manifest)
    assert spec.to_manifest() == {k: v for k, v in manifest.items() if k != "artefacts"}
    assert spec.classes == ("no_tumor", "tumor") and spec.image_size == spec.preprocessing.size == 32
    assert spec.mae.visible.shape == (spec.mae.k, 16) and spec.mae.visible.dtype == np.bool_
    assert spec.purifier.alphas_cumprod.shape == (spec.purifier.num_timesteps + 1,)
    with pytest.raises(ValueError):
        spec.mae.visible[0, 0] = True  # read-only arrays
    with pytest.raises(TypeError):
        spec.provenance["run"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        spec.image_size = 64  # type: ignore[misc]


def test_masks_are_compact_and_validated() -> None:
    rng = np.random.default_rng(0)
    v = rng.random((4, 256)) < 0.5
    v[0] = ~v[1:].all(axis=0) & v[0]  # make every patch hidden somewhere
    enc = encode_masks(v)
    assert enc["shape"] == [4, 256] and len(enc["data"]) == 172  # 128 bytes in base64
    np.testing.assert_array_equal(decode_masks(enc), v)
    with pytest.raises(BundleError, match="mae.visible.data: 128 bytes, but shape \\[4, 264\\] needs 132"):
        decode_masks({**enc, "shape": [4, 264]})
    bad = encode_masks(np.ones((1, 12), bool))
    with pytest.raises(BundleError, match="padding bits"):
        decode_masks({**bad, "shape": [1, 10]})
    with pytest.raises(BundleError, match="encoding"):
        decode_masks({**enc, "encoding": "hex"})
    with pytest.raises(BundleError, match="base64"):
        decode_masks({**enc, "data": "***"})
    with pytest.raises(BundleError, match="hidden by no mask set"):
        MaeSpec(patch=8, k=2, norm_pix=False, visible=np.array([[True, True], [True, False]]))
    with pytest.raises(BundleError, match="2 mask sets, but mae.k is 3"):
        MaeSpec(patch=8, k=3, norm_pix=False, visible=np.array([[True, False], [False, True]]))


def _edit(m: dict, path: str, value: object) -> dict:
    out = json.loads(json.dumps(m))
    *heads, last = path.split(".")
    d = out
    for h in heads:
        d = d[h]
    d[last] = value
    return out


@pytest.mark.parametrize(("path", "value", "message"), [
    ("image_size", "32", "manifest image_size: expected an integer, got '32'"),
    ("classes", ["tumor", "tumor"], "manifest classes: expected at least two unique"),
    ("preprocessing.percentiles", [1.0, 99.0], "preprocessing.percentiles: .* not implemented"),
    ("preprocessing.function", "other.preprocess", "preprocessing.function: 'other.preprocess' is not implemented"),
    ("preprocessing.size", 64, "preprocessing.size: 64, but image_size is 32"),
    ("purifier.sampler", "ddpm_ancestral", "purifier.sampler: 'ddpm_ancestral' is not implemented"),
    ("purifier.schedule", "sigmoid", "purifier.schedule: 'sigmoid' is not implemented"),
    ("purifier.steps", 0, "purifier.steps: expected an integer >= 1, got 0"),
    ("purifier.alphas_cumprod", [1.0, 0.5], "purifier.alphas_cumprod: 2 values"),
    ("purifier.alphas_cumprod", ["x"] * 1001, "purifier.alphas_cumprod: expected a finite number, got 'x'"),
    ("mae.patch", 5, "mae.patch: 5 does not divide image_size 32"),
    ("mae.norm_pix", 0, "mae.norm_pix: expected true or false"),
    ("mae.visible", [[1, 0], [0, 1]], "mae.visible: expected an object"),
    ("purifier.space", "y = 2x - 1", "manifest purifier: unknown keys \\['space'\\]"),
    ("provenance", [], "manifest provenance: expected an object"),
    ("mae", None, "manifest mae: expected an object, got NoneType"),
    ("purifier", ["x"], "manifest purifier: expected an object, got list"),
    ("image_size", 10**9, "manifest image_size: expected an integer <= 4096"),
    ("preprocessing.size", 10**9, "manifest preprocessing.size: expected an integer <= 4096"),
    ("purifier.steps", 10**6, "manifest purifier.steps: expected an integer <= 1000, got 1000000"),
    ("gate.t_max", 5000, "manifest gate.t_max: 5000 is beyond the purifier's schedule"),
    ("gate.tau", float("nan"), "tau = nan: expected a finite number"),
    ("gate.tau_high", float("inf"), "tau_high = inf: expected a finite number"),
    ("gate.t_min", -1, "t_min = -1"),
    ("gate.policy", 3, "policy = 3: expected a string"),
    ("classes", "ab", "manifest classes: expected a list of names, got 'ab'"),
    ("classes", ["a", 1], "manifest classes: expected a non-empty string, got 1"),
])
def test_bad_fields_are_named(manifest: dict, path: str, value: object, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        _parse(_edit(manifest, path, value))


def test_missing_and_unimplemented_gate_refused(manifest: dict) -> None:
    with pytest.raises(BundleError, match="manifest preprocessing.grey: missing"):
        _parse(_edit(manifest, "preprocessing", {k: v for k, v in manifest["preprocessing"].items() if k != "grey"}))
    with pytest.raises(BundleError, match="gate"):
        _parse(_edit(manifest, "gate", "mean"))
    with pytest.raises(BundleError, match="tau"):
        _parse(_edit(manifest, "gate.tau", "x"))


def test_version_one_refused_with_conversion_hint(manifest: dict) -> None:
    assert FORMAT_VERSION == 2
    with pytest.raises(BundleError, match="version 1 is not supported.*convert_v1_bundle"):
        _parse(_edit(manifest, "format_version", 1))
    with pytest.raises(BundleError, match="version 3 is not supported.*re-export"):
        _parse(_edit(manifest, "format_version", 3))


def test_preprocessing_defaults_are_what_scan_implements() -> None:
    from medfedpure.scan import PERCENTILES

    p = Preprocessing(size=128)
    assert p.percentiles == tuple(PERCENTILES) and p.function == "medfedpure.scan.preprocess"
    assert Preprocessing.from_dict(p.to_dict()) == p
    table = np.linspace(1, 0.1, 11)
    assert PurifierSpec.from_dict(PurifierSpec("linear", 10, table, 1, "ddim_eta0_uniform").to_dict()).steps == 1


def _make_v1(tiny: Path, out: Path) -> bytes:
    """A format-1 bundle holding the tiny bundle's files (graphs given exporter-style metadata)."""
    from medfedpure.gate import GateSpec

    shutil.copytree(tiny, out)
    (out / "signature.json").unlink()  # format 1 had no signatures
    m = json.loads((tiny / "manifest.json").read_text())
    for a in m["artefacts"].values():
        if a["format"] == "onnx":
            g = onnx.load_from_string((out / a["path"]).read_bytes())
            p = g.graph.node[0].metadata_props.add()
            p.key, p.value = "pkg.torch.onnx.stack_trace", 'File "/build/medfedpure/models/x.py", line 1'
            data = g.SerializeToString()
            (out / a["path"]).write_bytes(data)
            a["sha256"], a["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    spec = verify_bundle(tiny).spec
    legacy_gate = spec.gate.to_legacy_dict() if hasattr(spec.gate, "to_legacy_dict") else m["gate"]
    v1 = {**m, "format_version": 1, "gate": legacy_gate,
          "preprocessing": {**m["preprocessing"], "function": "medfedpure.preprocess"},
          "mae": {**m["mae"], "visible": spec.mae.visible.astype(int).tolist()},
          "purifier": {**m["purifier"], "space": "y = 2x - 1 (x in [0, 1])",
                       "step_times": "t_i = t_star * (K - i) / K, i = 0..K"}}
    assert GateSpec.from_legacy_dict(legacy_gate).to_dict() == m["gate"]
    raw = json.dumps(v1, indent=2, sort_keys=True).encode()
    (out / "manifest.json").write_bytes(raw)
    return raw


def test_convert_v1_bundle(tmp_path: Path) -> None:
    from medfedpure.export.bundle_writer import convert_v1_bundle
    from medfedpure.export.onnx_export import metadata_entries
    from onnx import numpy_helper

    tiny = cached_tiny_bundle()
    raw = _make_v1(tiny, tmp_path / "v1")
    with pytest.raises(BundleError, match="version 1"):
        verify_bundle(tmp_path / "v1")
    vb = convert_v1_bundle(tmp_path / "v1", tmp_path / "v2")
    ref = verify_bundle(tiny)
    assert vb.spec.provenance["converted_from"]["bundle_id"] == hashlib.sha256(raw).hexdigest()
    assert vb.spec.to_manifest()["gate"] == ref.spec.to_manifest()["gate"]
    np.testing.assert_array_equal(vb.spec.mae.visible, ref.spec.mae.visible)
    np.testing.assert_array_equal(vb.spec.purifier.alphas_cumprod, ref.spec.purifier.alphas_cumprod)
    for name, a in ref.artefacts.items():
        new, old = vb.read_bytes(name), (tmp_path / "v1" / a.path).read_bytes()
        if a.format in ("safetensors", "markdown"):  # weights and the model card: copied unchanged
            assert new == old
            continue
        g_new, g_old = onnx.load_from_string(new), onnx.load_from_string(old)
        assert metadata_entries(g_new) == [] and metadata_entries(g_old) != []
        assert [(t.name, numpy_helper.to_array(t).tobytes()) for t in g_new.graph.initializer] == [
            (t.name, numpy_helper.to_array(t).tobytes()) for t in g_old.graph.initializer]
        assert g_new == onnx.load_from_string(ref.read_bytes(name))  # the tiny bundle's graphs were already clean
    with pytest.raises(BundleError, match="not 1"):
        convert_v1_bundle(tmp_path / "v2", tmp_path / "v3")


def test_classifier_output_width_checked_at_run_time() -> None:
    """Fail closed: a classifier whose output width is not the number of classes gives no label (the
    graph's declared width is checked on load; this is the engine's own check of what it returned)."""
    from medfedpure.runtime.defender import Defender
    from medfedpure.runtime.engines import EngineError
    from tiny_bundle import tiny_scans

    d = Defender.load(cached_tiny_bundle(), backend="onnxruntime", device="cpu", threads=1)
    x = tiny_scans(2, 7)
    assert d.engine.classify(x).shape == (2, 2)
    d.engine.num_classes = 3  # as if the graph returned 2 columns for 3 classes
    with pytest.raises(EngineError, match="returned shape \\[2, 2\\]; the bundle has 3 classes"):
        d.engine.classify(x)
    for overlap in (True, False):
        d.overlap = overlap
        r = d.run((x[0, 0] * 255).astype(np.uint8), seed=0)
        assert r.status == "unverified" and r.label is None and r.probabilities == {}
        assert "3 classes" in r.reason


def test_defender_refuses_a_classifier_width_on_every_backend() -> None:
    """The Defender's own check (not only the onnxruntime engine's): the torch engine returning three
    columns for a two-class bundle gives `unverified`, never probabilities summing to less than 1."""
    from medfedpure.runtime.defender import Defender
    from tiny_bundle import tiny_scans

    d = Defender.load(cached_tiny_bundle(), backend="torch", device="cpu", overlap=False)
    x = tiny_scans(2, 7)
    orig = d.engine.classify

    def three_columns(xb):
        p = orig(xb)
        return __import__("torch").cat([p * 0.5, p[:, :1] * 0 + 0.5], dim=1)  # rows still sum to 1

    d.engine.classify = three_columns
    r = d.run((x[0, 0] * 255).astype(np.uint8), seed=0)
    assert r.status == "unverified" and r.label is None and r.probabilities == {}
    assert "declares 2 classes" in r.reason
