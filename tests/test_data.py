"""medfedpure.data: synthetic generator, Br35H reader and partitioner, splits, loader, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medfedpure.cli import app as root_app
from medfedpure.data import (
    CLASSES,
    LESION_KINDS,
    DataFolderError,
    SynthConfig,
    clear_cache,
    generate_synthetic,
    lesion_kinds,
    load_split,
    make_site_profiles,
    make_splits,
    num_sites,
    read_splits,
    split_files,
)
from medfedpure.data.anatomy import load_anatomy
from medfedpure.data.br35h import partition_labels, read_br35h, write_br35h_sites
from medfedpure.data.info import background_noise_sigma
from medfedpure.data.synth import SiteProfile, render_scan, site_labels
from medfedpure.scan import load_scan, preprocess
from PIL import Image
from typer.testing import CliRunner

TINY = SynthConfig(sites=2, per_site=10, size=64, seed=3)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


@pytest.fixture(scope="module")
def anat():
    return load_anatomy()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory, anat) -> Path:
    root = tmp_path_factory.mktemp("synth") / "d"
    generate_synthetic(root, TINY, workers=1, progress=False)
    make_splits(root, seed=TINY.seed)
    return root


# -- synthetic generator --------------------------------------------------------------------------

def test_synth_is_determined_by_seed(tiny_root, tmp_path):
    again = tmp_path / "again"
    generate_synthetic(again, TINY, workers=2, progress=False)  # another process count: same bytes
    make_splits(again, seed=TINY.seed)
    a, b = _all_bytes(tiny_root), _all_bytes(again)
    assert a.keys() == b.keys() and len(a) == 2 * 10 + 3
    assert all(a[k] == b[k] for k in a)

    other = tmp_path / "other"
    generate_synthetic(other, SynthConfig(sites=2, per_site=10, size=64, seed=4), workers=1, progress=False)
    c = _all_bytes(other)
    pngs = [k for k in a if k.endswith(".png")]
    same = sum(1 for k in pngs if k in c and c[k] == a[k])
    assert same == 0, f"{same} identical scans across seeds 3 and 4"


def test_synth_workers_never_fork_a_threaded_caller(tiny_root, tmp_path, monkeypatch):
    """A child forked while another thread of the caller holds a lock can wait on it for ever (the generator's
    workers hung so under pytest-xdist, inside `bundle build`). With a thread busy in numpy the whole time,
    two workers must finish and give the same bytes, and they must not come from a plain fork."""
    import multiprocessing as mp
    import threading

    used = []
    real = mp.get_context
    monkeypatch.setattr(mp, "get_context", lambda method=None: (used.append(method), real(method))[1])
    stop = threading.Event()

    def busy() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            np.percentile(rng.random(20000), [1, 50, 99])

    th = threading.Thread(target=busy, daemon=True)
    th.start()
    try:
        generate_synthetic(tmp_path / "d", TINY, workers=2, progress=False)
    finally:
        stop.set()
        th.join()
    assert used and "fork" not in used and used[0] in ("forkserver", "spawn")
    make_splits(tmp_path / "d", seed=TINY.seed)
    a, b = _all_bytes(tiny_root), _all_bytes(tmp_path / "d")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_synth_layout_and_dataset_json(tiny_root):
    meta = json.loads((tiny_root / "dataset.json").read_text())
    assert meta["kind"] == "synthetic" and "not Br35H" in meta["note"]
    assert meta["seed"] == 3 and meta["size"] == 64 and meta["num_sites"] == 2
    assert meta["classes"] == list(CLASSES) and meta["label_dirs"] == {"no": 0, "yes": 1}
    assert meta["config"]["per_site"] == 10
    assert [SiteProfile(**p) for p in meta["site_profiles"]] == make_site_profiles(2, 3)
    assert meta["counts"] == [{"no_tumor": 5, "tumor": 5}] * 2
    assert len(meta["fingerprint"]) == 64
    assert num_sites(tiny_root) == 2
    for site in range(2):
        for d, n in (("yes", 5), ("no", 5)):
            files = sorted((tiny_root / f"site_{site}" / d).glob("*.png"))
            assert len(files) == n
            im = Image.open(files[0])
            assert im.mode == "L" and im.size == (64, 64)
    lines = (tiny_root / "scan_params.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 20
    assert all((r["tumour"] is not None) == (r["label"] == 1) for r in recs)
    assert all(("/yes/" in r["file"]) == (r["label"] == 1) for r in recs)


def test_site_labels_balanced_and_seeded():
    cfg = SynthConfig(sites=3, per_site=101, size=64, seed=0)
    for s in range(3):
        lab = site_labels(cfg, s)
        assert lab.dtype == np.int64 and lab.shape == (101,) and lab.sum() == 50  # round(50.5) = 50
    assert not np.array_equal(site_labels(cfg, 0), site_labels(cfg, 1))
    np.testing.assert_array_equal(site_labels(cfg, 2), site_labels(cfg, 2))


def test_site_profiles_are_non_iid_and_measurable(anat):
    profiles = make_site_profiles(4, 0)
    assert [p.t2_weight < 0.5 for p in profiles] == [True, False, True, False]
    for field in ("noise_sigma", "kspace_fraction", "bias_strength", "fov_mm"):
        vals = [getattr(p, field) for p in profiles]
        assert len(set(vals)) == 4, field
    # The noise in the air background (Rayleigh) is a property of the site: the estimate from
    # rendered scans recovers sigma * kspace_fraction (k-space truncation scales the noise std).
    cfg = SynthConfig(sites=4, per_site=8, size=64, seed=0)
    expected, measured = [], []
    for s, p in enumerate(profiles):
        est = [background_noise_sigma(render_scan(anat, p, cfg, s, i, 0).image) for i in range(8)]
        expected.append(p.noise_sigma * p.kspace_fraction)
        measured.append(float(np.mean(est)))
    ratios = np.array(measured) / np.array(expected)
    assert np.all((ratios > 0.8) & (ratios < 1.25)), ratios
    assert list(np.argsort(measured)) == list(np.argsort(expected))
    with pytest.raises(ValueError, match="noise_sigma"):
        SiteProfile(t2_weight=0.1, noise_sigma=-1.0, noise_spread=0.1, kspace_fraction=1.0,
                    bias_strength=0.1, fov_mm=220.0, gamma=1.0)


def test_tumour_changes_the_scan_where_the_mask_is(anat):
    cfg = SynthConfig(sites=2, per_site=8, size=64, seed=1)
    profiles = make_site_profiles(2, 1)
    inside, outside = [], []
    for i in range(6):
        no = render_scan(anat, profiles[0], cfg, 0, i, 0)
        yes = render_scan(anat, profiles[0], cfg, 0, i, 1)
        assert not no.tumor_mask.any() and yes.tumor_mask.sum() > 5
        t = yes.params["tumour"]
        diff = np.abs(yes.image - no.image)
        # beyond 4 sigma of the mass-effect displacement the anatomy is the same
        ci, cj = t["centre_px"]
        mm = yes.params["fov_mm"] / cfg.size
        rr, cc = np.mgrid[: cfg.size, : cfg.size]
        far = np.hypot(rr - ci, cc - cj) * mm > 4 * 1.6 * t["radius_mm"] + 3 * mm
        inside.append(float(diff[yes.tumor_mask].mean()))
        if far.any():
            outside.append(float(diff[far].mean()))
    assert min(inside) > 0.02
    assert max(outside) < 0.1 * min(inside), (inside, outside)


def test_generator_versions_share_anatomy_but_differ(anat):
    prof = make_site_profiles(1, 0)[0]
    v1 = render_scan(anat, prof, SynthConfig(sites=1, per_site=4, size=64, seed=0, version=1), 0, 0, 1)
    v2 = render_scan(anat, prof, SynthConfig(sites=1, per_site=4, size=64, seed=0, version=2), 0, 0, 1)
    assert v1.params == v2.params  # same slice, noise and tumour draw
    assert not np.array_equal(v1.png, v2.png)  # scalp wobble and tumour texture differ


def test_subtle_fraction_controls_tumour_kinds(anat):
    cfg = SynthConfig(sites=1, per_site=40, size=32, seed=0, subtle_fraction=0.0)
    prof = make_site_profiles(1, 0)[0]
    kinds = {render_scan(anat, prof, cfg, 0, i, 1).params["tumour"]["kind"] for i in range(15)}
    assert kinds == {"conspicuous"}
    cfg = SynthConfig(sites=1, per_site=40, size=32, seed=0, subtle_fraction=1.0)
    kinds = {render_scan(anat, prof, cfg, 0, i, 1).params["tumour"]["kind"] for i in range(15)}
    assert kinds == {"small", "faint"}


@pytest.mark.parametrize("kw, msg", [
    ({"sites": 0}, "sites"), ({"per_site": 1}, "per_site"), ({"size": 16}, "size"), ({"seed": -1}, "seed"),
    ({"tumor_fraction": 1.0}, "tumor_fraction"), ({"z_range_mm": (30.0, 10.0)}, "z_range"),
    ({"version": 3}, "version"),
])
def test_synth_config_refuses_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SynthConfig(**kw)


def test_synth_refuses_non_empty_folder(tiny_root):
    with pytest.raises(DataFolderError, match="not empty"):
        generate_synthetic(tiny_root, TINY, workers=1, progress=False)


# -- splits ---------------------------------------------------------------------------------------

def test_splits_deterministic_disjoint_stratified(tiny_root, tmp_path):
    sp = read_splits(tiny_root)
    assert sp["seed"] == 3 and sp["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    for site in range(2):
        parts = sp["sites"][f"site_{site}"]
        sets = [set(parts[s]) for s in ("train", "val", "test")]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        files = {p.relative_to(tiny_root).as_posix() for p in (tiny_root / f"site_{site}").rglob("*.png")}
        assert set().union(*sets) == files
        for s, n in (("train", 3), ("val", 1), ("test", 1)):  # 5 per class: round(.75)=1, round(.75)=1
            assert sum("/yes/" in p for p in parts[s]) == n and sum("/no/" in p for p in parts[s]) == n
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    assert make_splits(copy, seed=3)["sites"] == sp["sites"]
    assert make_splits(copy, seed=4)["sites"] != sp["sites"]
    with pytest.raises(ValueError, match="fractions"):
        make_splits(copy, fractions=(0.5, 0.4, 0.4))


@settings(max_examples=40, deadline=None)
@given(n_yes=st.integers(0, 60), n_no=st.integers(0, 60), seed=st.integers(0, 2**32 - 1),
       val=st.floats(0.0, 0.4), test=st.floats(0.0, 0.4))
def test_split_site_properties(n_yes, n_no, seed, val, test):
    from medfedpure.data.splits import split_site

    files = [(f"site_0/yes/{i}.png", 1) for i in range(n_yes)] + [(f"site_0/no/{i}.png", 0) for i in range(n_no)]
    parts = split_site(files, 0, seed, (1.0 - val - test, val, test))
    allp = parts["train"] + parts["val"] + parts["test"]
    assert sorted(allp) == sorted(p for p, _ in files)  # disjoint and covering
    for s, f in (("val", val), ("test", test)):
        assert sum("/yes/" in p for p in parts[s]) == round(n_yes * f)
        assert sum("/no/" in p for p in parts[s]) == round(n_no * f)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 1), min_size=20, max_size=200), sites=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), alpha=st.one_of(st.none(), st.floats(0.5, 100.0)))
def test_partition_properties(labels, sites, seed, alpha):
    labels = np.array(labels)
    parts = partition_labels(labels, sites, seed=seed, alpha=alpha, min_per_site=2)
    assert len(parts) == sites
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 2
    if alpha is None:  # IID: per-class counts differ by at most one between sites
        for c in (0, 1):
            counts = [int((labels[p] == c).sum()) for p in parts]
            assert max(counts) - min(counts) <= 1


def test_splits_stratified_proportions_large():
    from medfedpure.data.splits import split_site

    files = [(f"site_0/yes/{i:04d}.png", 1) for i in range(300)] + [(f"site_0/no/{i:04d}.png", 0) for i in range(100)]
    parts = split_site(files, 0, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [280, 60, 60]
    assert sum("/yes/" in p for p in parts["val"]) == 45 and sum("/no/" in p for p in parts["val"]) == 15
    # order of the input list does not matter
    assert split_site(files[::-1], 0, seed=0) == parts


# -- loader ---------------------------------------------------------------------------------------

def test_load_split_contract(tiny_root):
    clear_cache(tiny_root)
    x, y = load_split(tiny_root, 1, "train", size=48)
    assert x.shape == (6, 1, 48, 48) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    files = read_splits(tiny_root)["sites"]["site_1"]["train"]
    np.testing.assert_array_equal(y, [1 if "/yes/" in f else 0 for f in files])
    np.testing.assert_array_equal(x[0], preprocess(load_scan(tiny_root / files[0]), 48))
    # cached (memory and disk): equal values, fresh arrays
    x2, y2 = load_split(tiny_root, 1, "train", size=48)
    assert x2 is not x and np.array_equal(x2, x) and np.array_equal(y2, y)
    assert list((tiny_root / ".cache").glob("split-*.npz"))
    clear_cache()
    x3, _ = load_split(tiny_root, 1, "train", size=48)  # from disk
    np.testing.assert_array_equal(x3, x)
    xa, ya = load_split(tiny_root, 0, "all", size=32)
    assert xa.shape == (10, 1, 32, 32) and ya.sum() == 5
    with pytest.raises(DataFolderError, match="sites 0..1"):
        load_split(tiny_root, 2, "train")
    with pytest.raises(DataFolderError, match="split="):
        load_split(tiny_root, 0, "validation")
    with pytest.raises(DataFolderError, match="does not exist"):
        num_sites(tiny_root / "nope")


def test_load_split_names_a_broken_file(tiny_root, tmp_path):
    from medfedpure.scan import ScanError

    copy = tmp_path / "broken"
    shutil.copytree(tiny_root, copy, ignore=shutil.ignore_patterns(".cache"))
    victim = read_splits(copy)["sites"]["site_0"]["val"][0]
    (copy / victim).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ScanError, match=Path(victim).name):
        load_split(copy, 0, "val", size=32)
    (copy / victim).unlink()
    with pytest.raises(DataFolderError, match="missing"):
        load_split(copy, 0, "val", size=32)


def test_lesion_kinds_follow_the_split_and_refuse_a_disagreeing_record(tiny_root, tmp_path):
    """Each scan's lesion kind in split order, from the generator's own records; a record that disagrees with
    the scan's folder (or a missing one) is refused by name; data without records (real scans) has none."""
    files = split_files(tiny_root, 0, "all")
    kinds = lesion_kinds(tiny_root, 0, "all")
    assert len(kinds) == len(files)
    records = {json.loads(line)["file"]: json.loads(line) for line in
               (tiny_root / "scan_params.jsonl").read_text().splitlines()}
    for (rel, label), kind in zip(files, kinds, strict=True):
        assert (kind == "none") == (label == 0)
        assert kind == "none" or kind == records[rel]["tumour"]["kind"] and kind in LESION_KINDS
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy, ignore=shutil.ignore_patterns(".cache"))
    lines = (copy / "scan_params.jsonl").read_text().splitlines()
    yes = next(i for i, line in enumerate(lines) if json.loads(line)["tumour"] is not None
               and json.loads(line)["site"] == 0)
    rec = json.loads(lines[yes])
    (copy / "scan_params.jsonl").write_text("\n".join(lines[:yes] + [json.dumps({**rec, "tumour": None})]
                                                     + lines[yes + 1:]))
    with pytest.raises(DataFolderError, match=Path(rec["file"]).name + ".*disagrees"):
        lesion_kinds(copy, 0, "all")
    (copy / "scan_params.jsonl").write_text("\n".join(lines[:yes] + lines[yes + 1:]))
    with pytest.raises(DataFolderError, match="no record of " + rec["file"]):
        lesion_kinds(copy, 0, "all")
    (copy / "scan_params.jsonl").unlink()
    assert lesion_kinds(copy, 0, "all") is None


# -- Br35H ----------------------------------------------------------------------------------------

def _png(path: Path, seed: int, shape=(40, 52)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


@pytest.fixture()
def fake_br35h(tmp_path) -> Path:
    root = tmp_path / "br35h"
    for d in ("yes", "no", "pred"):
        (root / d).mkdir(parents=True)
    for i in range(14):
        _png(root / "yes" / f"y{i}.jpg", 100 + i)  # PIL sniffs content; the extension is only a filter
    for i in range(12):
        _png(root / "no" / f"no{i}.jpg", 200 + i)
    shutil.copy(root / "yes" / "y0.jpg", root / "yes" / "y0_copy.jpg")  # duplicates (same label)
    shutil.copy(root / "yes" / "y1.jpg", root / "yes" / "zz_dup.jpg")
    shutil.copy(root / "no" / "no3.jpg", root / "no" / "no3 (1).jpg")
    _png(root / "yes" / "conflict.jpg", 999)  # same bytes under yes/ and no/: dropped
    shutil.copy(root / "yes" / "conflict.jpg", root / "no" / "conflict.jpg")
    for i in range(3):
        _png(root / "pred" / f"pred{i}.jpg", 300 + i)
    (root / "yes" / "notes.txt").write_text("not an image")
    return root


def test_br35h_reader_dedupes(fake_br35h):
    idx = read_br35h(fake_br35h)
    assert len(idx.items) == 26 and idx.labels.sum() == 14
    assert len(idx.duplicates) == 3 and len(idx.conflicts) == 1
    # the first copy by sorted path is kept: "no3 (1).jpg" < "no3.jpg"
    assert {p.name for p in idx.duplicates} == {"y0_copy.jpg", "zz_dup.jpg", "no3.jpg"}
    assert idx.skipped == 4  # pred/ x3 and notes.txt
    assert len({it.sha256 for it in idx.items}) == 26
    assert not any("pred" in it.path.parts for it in idx.items)
    (fake_br35h / "no").rename(fake_br35h / "other")
    with pytest.raises(DataFolderError, match="lacks no/"):
        read_br35h(fake_br35h)


def test_partition_iid_vs_dirichlet():
    labels = np.array([0] * 400 + [1] * 600)
    iid = partition_labels(labels, 4, seed=0)
    assert np.array_equal(np.sort(np.concatenate(iid)), np.arange(1000))
    for part in iid:
        assert len(part) in (250,) and abs(labels[part].mean() - 0.6) <= 0.01
    again = partition_labels(labels, 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(iid, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(iid, partition_labels(labels, 4, seed=1), strict=True))

    skew = partition_labels(labels, 4, seed=0, alpha=0.1)
    assert np.array_equal(np.sort(np.concatenate(skew)), np.arange(1000))
    fr = [labels[p].mean() for p in skew]
    assert max(fr) - min(fr) > 0.4 and min(len(p) for p in skew) >= 10
    mild = partition_labels(labels, 4, seed=0, alpha=1000.0)
    assert max(abs(labels[p].mean() - 0.6) for p in mild) < 0.1
    with pytest.raises(ValueError, match="alpha"):
        partition_labels(labels, 4, seed=0, alpha=0.0)
    with pytest.raises(ValueError, match="fewer sites"):
        partition_labels(labels[:30], 4, seed=0)


def test_br35h_sites_written_self_contained(fake_br35h, tmp_path):
    out = tmp_path / "sites"
    meta = write_br35h_sites(read_br35h(fake_br35h), out, 2, seed=0, min_per_site=5, source=fake_br35h)
    assert meta["kind"] == "br35h" and meta["partition"] == {"scheme": "iid", "alpha": None, "min_per_site": 5}
    assert meta["dedup"] == {"unique": 26, "duplicates_removed": 3, "label_conflicts_removed": 1, "skipped_files": 4}
    assert sum(c["tumor"] for c in meta["counts"]) == 14 and sum(c["no_tumor"] for c in meta["counts"]) == 12
    files = [p for p in out.rglob("*.jpg")]
    assert len(files) == 26 and not any(p.is_symlink() for p in files)
    make_splits(out, seed=0)
    shutil.rmtree(fake_br35h)  # the data folder does not depend on the source
    x, y = load_split(out, 0, "all", size=32)
    assert x.shape == (13, 1, 32, 32) and y.shape == (13,)


# -- CLI ------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_synth_info_split(tmp_path, fake_br35h, anat):
    out = tmp_path / "syn"
    r = runner.invoke(root_app, ["data", "synth", "--out", str(out), "--sites", "2", "--per-site", "10",
                                 "--size", "48", "--seed", "5", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "wrote 20 scans" in r.output
    assert read_splits(out)["seed"] == 5 and json.loads((out / "dataset.json").read_text())["seed"] == 5

    fig = tmp_path / "fig.png"
    r = runner.invoke(root_app, ["data", "info", str(out), "--figure", str(fig), "--per-class", "2"])
    assert r.exit_code == 0, r.output
    assert "site_1" in r.output and "no_tumor" in r.output and "not Br35H" in r.output
    im = Image.open(fig)
    assert im.size[0] > 200 and im.size[1] > 200

    r = runner.invoke(root_app, ["data", "synth", "--out", str(out), "--sites", "2", "--per-site", "10", "--size", "48"])
    assert r.exit_code == 2 and "not empty" in r.output
    r = runner.invoke(root_app, ["data", "synth", "--out", str(tmp_path / "x"), "--sites", "0"])
    assert r.exit_code == 2 and "sites" in r.output
    r = runner.invoke(root_app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "16"])
    assert r.exit_code == 2 and "size" in r.output

    sp = tmp_path / "sp"
    r = runner.invoke(root_app, ["data", "split", "--br35h", str(fake_br35h), "--sites", "2", "--out", str(sp),
                                 "--dirichlet", "5", "--seed", "1", "--min-per-site", "5"])
    assert r.exit_code == 0, r.output
    assert "3 duplicates" in r.output and "Dirichlet alpha=5.0" in r.output
    assert json.loads((sp / "dataset.json").read_text())["partition"]["alpha"] == 5.0
    assert read_splits(sp)["seed"] == 1
    r = runner.invoke(root_app, ["data", "info", str(sp)])
    assert r.exit_code == 0 and "kind=br35h" in r.output, r.output
    r = runner.invoke(root_app, ["data", "split", "--br35h", str(tmp_path / "missing"), "--sites", "2",
                                 "--out", str(tmp_path / "sp2")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(root_app, ["data", "split", "--br35h", str(fake_br35h), "--sites", "2",
                                 "--out", str(tmp_path / "sp3"), "--dirichlet", "0"])
    assert r.exit_code == 2


def test_cli_help_explains_options():
    for cmd, words in (("synth", ["--per-site", "--seed", "Scans per site"]),
                       ("split", ["--br35h", "--dirichlet", "pred/"]),
                       ("info", ["--figure", "example scans"])):
        r = runner.invoke(root_app, ["data", cmd, "--help"])
        assert r.exit_code == 0
        for w in words:
            assert w in r.output, (cmd, w)
