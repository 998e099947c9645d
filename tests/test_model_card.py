"""The model card of a bundle: written by the exporter, covered by the signature, printed by
``verify-bundle --card``, and its calibration section rewritten by a recalibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from medfedpure.export.model_card import CARD_PATH, model_card, render_card
from medfedpure.runtime.bundle import CARD_ARTEFACT, BundleError, verify_bundle
from PIL import Image
from signing_keys import test_key_files as key_files
from tiny_bundle import cached_tiny_bundle, tiny_scans
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """The tiny bundle recalibrated on 40 clean scans through the CLI (target rate 0.1), signed with the test key."""
    from medfedpure.cli import app

    root = tmp_path_factory.mktemp("cardsite")
    (root / "cal").mkdir()
    for i, im in enumerate(tiny_scans(40, 23)):
        Image.fromarray((im[0] * 255).astype(np.uint8)).save(root / "cal" / f"s{i:03d}.png")
    priv, _ = key_files()
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(root / "cal"), "--out",
                                 str(root / "b2"), "--key", str(priv), "--backend", "onnxruntime",
                                 "--min-scans", "10", "--target-ffr", "0.1",
                                 "--description", "tiny scans of seed 23"])
    assert r.exit_code == 0, r.output
    return root / "b2"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_exported_bundle_has_a_card_listed_and_in_the_manifest(tiny: Path) -> None:
    vb = verify_bundle(tiny)
    a = vb.artefacts[CARD_ARTEFACT]
    assert (a.path, a.role, a.format, a.precision) == (CARD_PATH, "card", "markdown", "none")
    text = vb.read_bytes(CARD_ARTEFACT).decode("utf-8")
    card = vb.manifest["provenance"]["card"]
    assert text == render_card(card)  # the file is the rendering of the signed structured card
    for heading in ("## Intended use", "## Out-of-scope uses", "## Training data and sites", "## Calibration",
                    "## Measured metrics", "## Limitations", "## License"):
        assert heading in text
    assert "CT" in text and "paediatric" in text and "non-axial" in text
    g = vb.spec.gate
    assert card["calibration"]["tau"] == g.tau and card["calibration"]["num_scans"] == g.calibration.num_val_scans
    assert card["calibration"]["achieved_false_flag_rate"] == g.calibration.val_false_flag_rate
    # metrics come from what the export measured, each with its command; none are invented
    assert card["metrics"] and all(m["command"].startswith("medfedpure export") for m in card["metrics"])
    top1 = vb.manifest["provenance"]["verification"]["fp32"]["classifier"]["top1"]
    assert card["metrics"][0]["value"] == top1
    # regenerating from the manifest's sections gives the same card (deterministic, ignores the old card)
    assert json.loads(json.dumps(model_card(vb.spec))) == card


def test_card_without_recorded_metrics_says_not_measured(tiny: Path) -> None:
    import dataclasses

    from medfedpure.runtime.manifest import thaw

    spec = verify_bundle(tiny).spec
    prov = {k: v for k, v in thaw(spec.provenance).items() if k not in ("verification", "measured_metrics")}
    card = model_card(dataclasses.replace(spec, provenance=prov))
    assert card["metrics"] == []
    assert "Not measured: no metrics were recorded" in render_card(card)
    prov["measured_metrics"] = [{"name": "clean accuracy", "value": 0.9, "command": "make eval", "n": 10},
                                {"name": "no command", "value": 1.0}]
    card = model_card(dataclasses.replace(spec, provenance=prov))
    assert card["metrics"] == [{"name": "clean accuracy", "value": 0.9, "command": "make eval", "n": 10}]
    assert "| clean accuracy | 0.9 | not recorded | 10 | `make eval` |" in render_card(card)


def test_tampered_card_fails_verification(tiny: Path, tmp_path: Path) -> None:
    b = _copy(tiny, tmp_path / "b")
    p = b / CARD_PATH
    p.write_text(p.read_text().replace("Not a medical device", "A certified medical device"))
    with pytest.raises(BundleError, match="MODEL_CARD.md"):
        verify_bundle(b)
    (b / CARD_PATH).unlink()
    with pytest.raises(BundleError, match="lacks files"):
        verify_bundle(b)


def test_card_artefact_must_be_card_markdown_none() -> None:
    from medfedpure.runtime.bundle import Artefact

    good = {"path": "MODEL_CARD.md", "sha256": "0" * 64, "bytes": 1, "role": "card", "format": "markdown",
            "precision": "none"}
    assert Artefact.from_dict("model_card", good).role == "card"
    for bad in ({"precision": "fp32"}, {"format": "onnx"}, {"role": "classifier"}):
        with pytest.raises(BundleError, match="model card"):
            Artefact.from_dict("x", {**good, **bad})


def test_verify_bundle_card_prints_it(tiny: Path) -> None:
    from medfedpure.cli import app

    r = CliRunner().invoke(app, ["verify-bundle", str(tiny), "--card"])
    assert r.exit_code == 0, r.output
    assert "OK · format" in r.output and "# Model card: medfedpure bundle" in r.output
    assert r.output.index("OK · format") < r.output.index("# Model card")  # verified first
    r = CliRunner().invoke(app, ["verify-bundle", str(tiny)])
    assert r.exit_code == 0 and "# Model card" not in r.output


def test_verify_bundle_card_on_a_bundle_without_one(tiny: Path, tmp_path: Path) -> None:
    """A bundle written before cards (no card artefact) verifies; --card says so and exits 1."""
    from medfedpure.cli import app
    from medfedpure.export.bundle_writer import ArtefactSource, write_bundle
    from medfedpure.runtime.manifest import thaw

    vb = verify_bundle(tiny)
    arts = {n: ArtefactSource(path=a.path, role=a.role, format=a.format, precision=a.precision,
                              data=vb.read_bytes(n)) for n, a in vb.artefacts.items() if n != CARD_ARTEFACT}
    import dataclasses

    spec = dataclasses.replace(vb.spec, provenance={k: v for k, v in thaw(vb.spec.provenance).items() if k != "card"})
    priv, _ = key_files()
    write_bundle(tmp_path / "old", arts, spec, signing_key=priv)
    r = CliRunner().invoke(app, ["verify-bundle", str(tmp_path / "old")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["verify-bundle", str(tmp_path / "old"), "--card"])
    assert r.exit_code == 1
    assert "no model card in this bundle" in r.output
    r = CliRunner().invoke(app, ["verify-bundle", str(tmp_path / "nope"), "--card"])
    assert r.exit_code == 2  # verification failure wins over the card question


def test_default_bundle_verifies_with_or_without_a_card() -> None:
    from medfedpure.cli import app
    from medfedpure.runtime.bundle import default_bundle_path

    r = CliRunner().invoke(app, ["verify-bundle", str(default_bundle_path()), "--card"])
    has = verify_bundle(default_bundle_path()).has(CARD_ARTEFACT)
    assert r.exit_code == (0 if has else 1), r.output
    assert ("no model card in this bundle" in r.output) != has


def test_recalibration_rewrites_the_calibration_section(tiny: Path, recalibrated: Path) -> None:
    src, new = verify_bundle(tiny), verify_bundle(recalibrated)
    c0, c1 = src.manifest["provenance"]["card"], new.manifest["provenance"]["card"]
    rec = new.spec.provenance["recalibration"]
    assert c1["calibration"]["tau"] == new.spec.gate.tau != c0["calibration"]["tau"]
    assert c1["calibration"]["target_false_flag_rate"] == 0.1
    assert c1["calibration"]["num_scans"] == rec["num_scans"] == 40
    assert c1["calibration"]["achieved_false_flag_rate"] == rec["achieved_false_flag_rate"]
    assert c1["calibration"]["recalibration"]["pixels_sha256"] == rec["pixels_sha256"]
    assert c1["calibration"]["recalibration"]["date"] == rec["date"]
    assert c1["calibration"]["source"] == "recalibrated on tiny scans of seed 23 (medfedpure calibrate --bundle)"
    assert rec["description"] == "tiny scans of seed 23"
    # every other section of the card is unchanged
    assert {k: v for k, v in c1.items() if k != "calibration"} == {k: v for k, v in c0.items() if k != "calibration"}
    text = new.read_bytes(CARD_ARTEFACT).decode()
    assert text == render_card(c1) and rec["pixels_sha256"] in text and f"{new.spec.gate.tau:.4g}" in text


def test_reissue_keeps_models_and_decisions_and_adds_metrics(tiny: Path, tmp_path: Path) -> None:
    from medfedpure import Defender
    from medfedpure.cli import app

    priv, _ = key_files()
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps([{"name": "clean accuracy", "value": 0.5, "command": "medfedpure eval …",
                                    "split": "test", "n": 8}]))
    r = CliRunner().invoke(app, ["bundle", "reissue", str(tiny), "--out", str(tmp_path / "b2"), "--reason",
                                 "card refresh", "--metrics", str(metrics), "--key", str(priv)])
    assert r.exit_code == 0, r.output
    src, new = verify_bundle(tiny), verify_bundle(tmp_path / "b2")
    assert new.bundle_id != src.bundle_id and new.signer is not None
    assert ({n: a.sha256 for n, a in new.artefacts.items() if n != CARD_ARTEFACT}
            == {n: a.sha256 for n, a in src.artefacts.items() if n != CARD_ARTEFACT})
    assert new.spec.gate == src.spec.gate and new.spec.effective_scope == src.spec.effective_scope
    rei = new.spec.provenance["reissue"]
    assert rei["source_bundle_id"] == src.bundle_id and rei["reason"] == "card refresh"
    text = new.read_bytes(CARD_ARTEFACT).decode()
    assert "| clean accuracy | 0.5 | test | 8 | `medfedpure eval …` |" in text
    x = tiny_scans(4, 5)
    a = Defender.load(tiny, backend="onnxruntime", threads=1).run_array(x, seeds=[1, 2, 3, 4])
    b = Defender.load(tmp_path / "b2", backend="onnxruntime", threads=1).run_array(x, seeds=[1, 2, 3, 4])
    assert [(r.label, r.probabilities, r.flagged, r.t_star) for r in a] == \
        [(r.label, r.probabilities, r.flagged, r.t_star) for r in b]


@pytest.mark.parametrize("bad", [[{"name": "x", "value": "high", "command": "c"}], [{"name": "x", "value": 1}],
                                 [{"name": "x", "value": float("nan"), "command": "c"}], {"name": "x"}])
def test_reissue_refuses_bad_metrics(tiny: Path, tmp_path: Path, bad) -> None:
    from medfedpure.cli import app

    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps(bad))
    r = CliRunner().invoke(app, ["bundle", "reissue", str(tiny), "--out", str(tmp_path / "b2"), "--reason", "x",
                                 "--metrics", str(metrics)])
    assert r.exit_code == 2 and "metric" in r.output and not (tmp_path / "b2").exists()


def test_the_shipped_default_bundle_has_a_card_and_declares_its_scope() -> None:
    from medfedpure.runtime.bundle import default_bundle_path

    vb = verify_bundle(default_bundle_path())
    assert vb.spec.scope is not None and vb.spec.scope.modalities == ("MR",)
    text = vb.read_bytes(CARD_ARTEFACT).decode()
    assert text == render_card(vb.manifest["provenance"]["card"]) and f"{vb.spec.gate.tau:.4g}" in text
