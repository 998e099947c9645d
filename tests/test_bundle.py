"""Bundle format: round trip, every kind of tampering refused before any parser sees a file, a strictly
parsed manifest (depth, types, NaN), and ONNX external data accepted only from listed, hashed artefacts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from medfedpure.export.bundle_writer import ArtefactSource, write_bundle
from medfedpure.export.signing import sign_manifest
from medfedpure.runtime.bundle import FORMAT_VERSION, BundleError, check_relpath, verify_bundle
from medfedpure.runtime.manifest import BundleSpec, MaeSpec, Preprocessing, PurifierSpec
from onnx import TensorProto, helper, numpy_helper
from signing_keys import TEST_KEY


def onnx_graph(width: int = 2, *, weight: np.ndarray | None = None, doc: str = "") -> bytes:
    """A small real ONNX model x [batch, 2] → probs [batch, width] (Identity, or MatMul with ``weight``)."""
    inits = [] if weight is None else [numpy_helper.from_array(weight.astype(np.float32), "W")]
    node = helper.make_node("Identity", ["x"], ["probs"]) if weight is None else \
        helper.make_node("MatMul", ["x", "W"], ["probs"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    m.ir_version = 8
    return m.SerializeToString()


PAYLOADS = {
    "classifier": ("classifier.onnx", "classifier", "onnx", "fp32", onnx_graph(doc="fp32")),
    "classifier.fp16": ("classifier.fp16.onnx", "classifier", "onnx", "fp16", onnx_graph(doc="fp16")),
    "mae.torch": ("torch/mae.safetensors", "mae", "safetensors", "fp32", b"weights" * 17),
}
CLS = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32",
                                    data=onnx_graph())}


LEGACY_GATE = {"stat": "mean", "topk": 0, "norm_pix": False, "patch": 8, "tau": 0.1, "tau_high": 0.2,
               "t_min": 4, "t_max": 10, "policy": "adaptive", "steps": 2}  # within the 10-step schedule


def small_spec(provenance: dict | None = None) -> BundleSpec:
    """A valid 32 px spec: 16 patches of 8 px, two mask sets (each hides half the patches)."""
    from medfedpure.gate import GateSpec

    visible = np.array([[True, False] * 8, [False, True] * 8])
    table = np.cos(np.linspace(0, 1.4, 11)) ** 2
    return BundleSpec(classes=("no_tumor", "tumor"), image_size=32, preprocessing=Preprocessing(size=32),
                      mae=MaeSpec(patch=8, k=2, norm_pix=False, visible=visible),
                      purifier=PurifierSpec(schedule="cosine", num_timesteps=10, alphas_cumprod=table / table[0],
                                            steps=2, sampler="ddim_eta0_uniform"),
                      gate=GateSpec.from_legacy_dict(LEGACY_GATE),
                      provenance={"code_commit": "abc"} if provenance is None else provenance)


def _write(root: Path) -> None:
    arts = {n: ArtefactSource(path=p, role=r, format=f, precision=pr, data=d)
            for n, (p, r, f, pr, d) in PAYLOADS.items()}
    write_bundle(root, arts, small_spec())


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    _write(root)
    return root


def test_round_trip(bundle: Path) -> None:
    vb = verify_bundle(bundle)
    raw = (bundle / "manifest.json").read_bytes()
    assert vb.bundle_id == hashlib.sha256(raw).hexdigest()
    assert vb.manifest["format_version"] == FORMAT_VERSION
    assert vb.classes == ("no_tumor", "tumor") and vb.image_size == 32
    assert vb.spec.to_manifest() == {k: v for k, v in json.loads(raw).items() if k != "artefacts"}
    np.testing.assert_array_equal(vb.spec.mae.visible, small_spec().mae.visible)
    for name, (_, role, fmt, prec, data) in PAYLOADS.items():
        assert vb.read_bytes(name) == data
        a = vb.artefacts[name]
        assert a.sha256 == hashlib.sha256(data).hexdigest() and a.bytes == len(data)
        assert vb.find(role, fmt, prec) is a
    assert vb.find("denoiser", "onnx", "fp32") is None
    # pinning: full id and a 16-digit prefix accepted, anything else refused
    verify_bundle(bundle, expected_id=vb.bundle_id)
    verify_bundle(bundle, expected_id=vb.bundle_id[:16])
    with pytest.raises(BundleError, match="pinned"):
        verify_bundle(bundle, expected_id="0" * 64)
    with pytest.raises(BundleError, match="no artefact"):
        vb.read_bytes("nope")


def test_writer_refuses_non_empty(bundle: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(bundle)


def test_flipped_byte_refused(bundle: Path) -> None:
    p = bundle / "classifier.onnx"
    data = bytearray(p.read_bytes())
    data[5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(bundle)


def test_truncated_file_refused(bundle: Path) -> None:
    p = bundle / "torch" / "mae.safetensors"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(BundleError, match="bytes"):
        verify_bundle(bundle)


@pytest.mark.parametrize("extra", ["evil.onnx", "torch/extra.bin", "sub/dir/x"])
def test_extra_file_refused(bundle: Path, extra: str) -> None:
    p = bundle / extra
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list"):
        verify_bundle(bundle)


def test_symlink_refused(bundle: Path, tmp_path: Path) -> None:
    # a listed artefact replaced by a link to an identical file outside the bundle
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / "classifier.onnx").read_bytes())
    (bundle / "classifier.onnx").unlink()
    os.symlink(outside, bundle / "classifier.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)


def test_symlinked_folder_refused(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", bundle / "linked")
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)


def test_symlinked_manifest_refused(bundle: Path, tmp_path: Path) -> None:
    m = bundle / "manifest.json"
    (tmp_path / "m.json").write_bytes(m.read_bytes())
    m.unlink()
    os.symlink(tmp_path / "m.json", m)
    with pytest.raises(BundleError, match="links are refused"):
        verify_bundle(bundle)


def _resign(bundle: Path) -> None:
    """Sign the manifest as it is now with the (trusted) test key, so that the checks after the
    signature are what a test exercises: a signed manifest is still validated field by field."""
    (bundle / "signature.json").write_bytes(sign_manifest((bundle / "manifest.json").read_bytes(), TEST_KEY))


def _edit_manifest(bundle: Path, fn) -> None:
    m = bundle / "manifest.json"
    d = json.loads(m.read_text())
    fn(d)
    m.write_text(json.dumps(d))
    _resign(bundle)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "a/../classifier.onnx", "./x", "a\\b",
                                 "manifest.json", ""])
def test_path_leaving_bundle_refused(bundle: Path, tmp_path: Path, bad: str) -> None:
    (tmp_path / "outside.onnx").write_bytes(PAYLOADS["classifier"][4])

    def fn(d):
        d["artefacts"]["classifier"]["path"] = bad

    _edit_manifest(bundle, fn)
    with pytest.raises(BundleError, match="path"):
        verify_bundle(bundle)


def test_missing_file_refused(bundle: Path) -> None:
    (bundle / "classifier.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="lacks files"):
        verify_bundle(bundle)


def test_manifest_problems_refused(bundle: Path, tmp_path: Path) -> None:
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format version"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", 1))
    with pytest.raises(BundleError, match="version 1 is not supported.*convert"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", FORMAT_VERSION))
    _edit_manifest(bundle, lambda d: d.pop("gate"))
    with pytest.raises(BundleError, match="lacks"):
        verify_bundle(bundle)
    _edit_manifest(bundle, lambda d: d.__setitem__("gate", {}))
    _edit_manifest(bundle, lambda d: d.__setitem__("extra_section", {}))
    with pytest.raises(BundleError, match="unknown sections"):
        verify_bundle(bundle)
    (bundle / "manifest.json").write_text("{not json")
    _resign(bundle)
    with pytest.raises(BundleError, match="JSON"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "absent")


def test_swap_after_verification_refused(bundle: Path) -> None:
    vb = verify_bundle(bundle)
    (bundle / "classifier.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError, match="changed after verification"):
        vb.read_bytes("classifier")


def test_check_relpath_accepts_plain_paths() -> None:
    assert str(check_relpath("tensorrt/sm90/classifier.plan")) == "tensorrt/sm90/classifier.plan"


def test_writer_makes_provenance_strict_json(tmp_path: Path) -> None:
    arts = CLS
    spec = small_spec({"metrics": {"max_update_norm": float("inf"), "x": [float("nan"), 1.0]}})
    vb = write_bundle(tmp_path / "b", arts, spec)
    assert vb.manifest["provenance"]["metrics"] == {"max_update_norm": "inf", "x": ["nan", 1.0]}
    assert vb.spec.provenance["metrics"]["x"] == ("nan", 1.0)  # read-only view


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    arts = CLS
    with pytest.raises(TypeError, match="JSON serializable"):
        write_bundle(tmp_path / "b", arts, small_spec({"bad": object()}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the manifest parsed strictly ---------------------------------------------------------------


@pytest.mark.parametrize(("raw", "message"), [
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests objects/arrays 100001 deep; at most 32"),
    ('{"provenance": {"x": ' + "[" * 40 + "]" * 40 + "}}", "nests objects/arrays 42 deep"),
    ('{"format_version": 2, "gate": {"tau": NaN}}', "non-standard constant NaN"),
    ('{"format_version": 2, "gate": {"tau_high": Infinity}}', "non-standard constant Infinity"),
    ('{"format_version": 2, "x": -Infinity}', "non-standard constant -Infinity"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"a": "\xff"}', "JSON"),
])
def test_manifest_json_is_bounded_and_strict(bundle: Path, raw: str, message: str) -> None:
    (bundle / "manifest.json").write_bytes(raw.encode("latin-1") if "\xff" in raw else raw.encode())
    _resign(bundle)
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle)


def test_depth_of_strings_is_not_counted(tmp_path: Path) -> None:
    from medfedpure.runtime.bundle import json_depth

    assert json_depth(b'{"a": "[[[[[[{{{{\\"[[", "b": [[1]]}') == 3
    assert json_depth(b"{}") == 1 and json_depth(b"1") == 0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("bytes", "12", "artefacts.classifier.bytes: expected an integer, got '12'"),
    ("bytes", 12.0, "artefacts.classifier.bytes: expected an integer, got 12.0"),
    ("bytes", True, "artefacts.classifier.bytes: expected an integer"),
    ("path", 5, "artefacts.classifier.path: expected a string, got 5"),
    ("sha256", None, "artefacts.classifier.sha256: expected a string"),
    ("role", ["classifier"], "artefacts.classifier.role: expected a string"),
    ("extra", 1, "artefacts.classifier: expected exactly the keys"),
])
def test_artefact_entry_types_are_named(bundle: Path, key: str, value: object, message: str) -> None:
    _edit_manifest(bundle, lambda d: d["artefacts"]["classifier"].__setitem__(key, value))
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle)


@pytest.mark.parametrize(("section", "value", "message"), [
    ("mae", None, "manifest mae: expected an object, got NoneType"),
    ("purifier", 3, "manifest purifier: expected an object, got int"),
    ("preprocessing", "x", "manifest preprocessing: expected an object, got str"),
    ("artefacts", [], "manifest 'artefacts' must be a non-empty object"),
    ("artefacts", {"classifier": [1]}, "manifest artefacts.classifier: expected an object"),
    ("image_size", 10**12, "manifest image_size: expected an integer <= 4096"),
])
def test_wrong_section_types_are_named(bundle: Path, section: str, value: object, message: str) -> None:
    _edit_manifest(bundle, lambda d: d.__setitem__(section, value))
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle)


def test_artefact_cannot_take_the_signature_name(bundle: Path) -> None:
    with pytest.raises(BundleError, match="collides with the bundle's signature.json"):
        check_relpath("signature.json")


# --- classifier width and ONNX external data ------------------------------------------------------


def test_classifier_width_must_match_classes(tmp_path: Path) -> None:
    arts = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32",
                                         data=onnx_graph(3))}
    with pytest.raises(BundleError, match="2 names .* but the classifier graph 'c.onnx' declares 3 outputs"):
        write_bundle(tmp_path / "b", arts, small_spec())
    arts["classifier"] = ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32",
                                        data=onnx_graph("classes"))  # symbolic width: unknown, refused
    with pytest.raises(BundleError, match="declares 'classes' outputs"):
        write_bundle(tmp_path / "b", arts, small_spec())
    with pytest.raises(BundleError, match="not a well-formed ONNX model"):
        write_bundle(tmp_path / "b", {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx",
                                                                   precision="fp32", data=b"\x08\x07c-graph")},
                     small_spec())


W_GOOD = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)


def _external(tmp_path: Path) -> tuple[bytes, bytes]:
    """(graph bytes, data bytes) of a MatMul classifier whose weight W lives in the external file w.bin."""
    from onnx.external_data_helper import convert_model_to_external_data

    m = onnx.load_from_string(onnx_graph(weight=W_GOOD))
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    d = tmp_path / "export"
    d.mkdir()
    onnx.save(m, d / "c.onnx")
    return (d / "c.onnx").read_bytes(), (d / "w.bin").read_bytes()


def test_unlisted_external_data_refused_even_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    graph, data = _external(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.bin").write_bytes(np.full((2, 2), 9, np.float32).tobytes())  # what ONNX Runtime would have read
    monkeypatch.chdir(cwd)
    arts = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32",
                                         data=graph)}
    with pytest.raises(BundleError, match="tensor 'W' keeps its data in the external file 'w.bin', which is not an "
                                          "onnx_data artefact listed"):
        write_bundle(tmp_path / "b", arts, small_spec())
    # listed, but as another format: still refused
    arts["w"] = ArtefactSource(path="w.bin", role="classifier", format="safetensors", precision="fp32", data=data)
    with pytest.raises(BundleError, match="not an onnx_data artefact"):
        write_bundle(tmp_path / "b", arts, small_spec())
    # listed but too short for the tensor's offset + length
    arts["w"] = ArtefactSource(path="w.bin", role="classifier", format="onnx_data", precision="fp32", data=data[:8])
    with pytest.raises(BundleError, match="offset and length inside 'w.bin'"):
        write_bundle(tmp_path / "b", arts, small_spec())


def test_listed_external_data_is_loaded_from_the_verified_bytes(tmp_path: Path, monkeypatch) -> None:
    import onnxruntime as ort
    from medfedpure.runtime.engines.base import EngineError
    from medfedpure.runtime.engines.onnxruntime import _attach_external_data

    graph, data = _external(tmp_path)
    arts = {"classifier": ArtefactSource(path="c.onnx", role="classifier", format="onnx", precision="fp32",
                                         data=graph),
            "classifier.data": ArtefactSource(path="w.bin", role="classifier", format="onnx_data", precision="fp32",
                                              data=data)}
    vb = write_bundle(tmp_path / "b", arts, small_spec())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.bin").write_bytes(np.full((2, 2), 9, np.float32).tobytes())
    monkeypatch.chdir(cwd)
    so = ort.SessionOptions()
    keep = _attach_external_data(so, vb, "c.onnx", vb.read_bytes("classifier"))
    assert keep == [data]
    sess = ort.InferenceSession(vb.read_bytes("classifier"), so, providers=["CPUExecutionProvider"])
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], W_GOOD)  # the bundle's W, not the 9s in the cwd
    # the data file edited after verification: refused when the engine reads it
    (tmp_path / "b" / "w.bin").write_bytes(np.full((2, 2), 9, np.float32).tobytes())
    with pytest.raises(BundleError, match="changed after verification"):
        _attach_external_data(ort.SessionOptions(), vb, "c.onnx", vb.read_bytes("classifier"))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(tmp_path / "b")
    # a graph naming a file that is no onnx_data artefact (verification refuses it first; the engine too)
    m = onnx.load_from_string(graph)
    m.graph.initializer[0].external_data[0].value = "other.bin"
    with pytest.raises(EngineError, match="'other.bin', which is not an onnx_data artefact"):
        _attach_external_data(ort.SessionOptions(), vb, "c.onnx", m.SerializeToString())
