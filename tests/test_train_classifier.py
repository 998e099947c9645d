"""Classifier and MAE training loops: configs, augmentation, loss decrease, determinism, resumption, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.classifier import (
    ClassifierTrainConfig,
    _loss,
    augment_batch,
    evaluate_classifier,
    fgsm_rs_batch,
    train_classifier,
)
from medfedpure.train.device import channels_last
from medfedpure.train.mae import MAETrainConfig, evaluate_mae, train_mae


def _blobs(n: int, seed: int, s: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Separable toy scans: class 1 has a bright disc at a random place."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = 0.3 + 0.05 * rng.standard_normal((n, 1, s, s))
    yy, xx = np.mgrid[:s, :s]
    for i in np.flatnonzero(y):
        cy, cx = rng.integers(8, s - 8, 2)
        x[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 0.9
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def _model(seed: int = 0) -> MoEClassifier:
    torch.manual_seed(seed)  # parameter init only
    return MoEClassifier(MoEConfig.preset("tiny"))


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(lr=0), dict(gamma=0.5), dict(noise_std=-1), dict(aug_prob=2),
                                dict(label_smoothing=1.0), dict(batch_size=0), dict(adv_eps=-0.01),
                                dict(adv_eps=0.2), dict(adv_frac=0.0), dict(adv_frac=1.5),
                                dict(adv_start_epoch=-1)])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        ClassifierTrainConfig.preset("tiny", **kw)
    with pytest.raises(ValueError, match="unknown preset"):
        ClassifierTrainConfig.preset("huge")


def test_augment_batch_deterministic_in_range_and_pure():
    x = torch.from_numpy(_blobs(6, 0)[0])
    x0 = x.clone()
    cfg = ClassifierTrainConfig.preset("tiny")
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(x, x0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    off = ClassifierTrainConfig.preset("tiny", flip=False, shift_px=0, gamma=1.0, contrast=0.0, noise_std=0.0)
    assert torch.equal(augment_batch(x, off, torch.Generator().manual_seed(3)), x)


def test_one_step_lowers_the_loss():
    m = _model()
    x, y = (torch.from_numpy(a) for a in _blobs(16, 1))
    cfg = ClassifierTrainConfig.preset("tiny")
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    before = float(_loss(m, x, y, cfg).detach())
    for _ in range(3):
        loss = _loss(m, x, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(_loss(m, x, y, cfg).detach()) < before


def test_fgsm_rs_batch_stays_in_the_ball_and_raises_the_loss():
    x_np, y_np = _blobs(16, 3)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    m = _model(1)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=3, noise_std=0.0, aug_prob=0.0, shift_px=0, flip=False)
    train_classifier(m, (x_np, y_np), (x_np, y_np), cfg, progress=False)
    m.train()
    eps = 8 / 255
    before = x.clone()
    xa = fgsm_rs_batch(m, x, y, eps, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)  # the caller's batch is not modified
    assert m.training  # mode restored
    assert xa.shape == x.shape and float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert float((xa[:8] - x[:8]).abs().max()) <= eps + 1e-6
    assert torch.equal(xa[8:], x[8:])  # the clean half is untouched
    assert float((xa[:8] - x[:8]).abs().max()) > 0.5 * eps
    same = fgsm_rs_batch(m, x, y, eps, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(xa, same)  # seeded
    m.eval()
    with torch.no_grad():
        nll = lambda z: float(F.nll_loss(torch.log(m(z[:8]).clamp_min(1e-12)), y[:8]))  # noqa: E731
        assert nll(xa) > nll(x)


def test_adversarial_training_runs_and_is_deterministic():
    x, y = _blobs(24, 4)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=2, adv_eps=4 / 255)
    a, b = _model(2), _model(2)
    ha = train_classifier(a, (x, y), (x, y), cfg, progress=False)
    hb = train_classifier(b, (x, y), (x, y), cfg, progress=False)
    assert ha["history"][-1]["train_loss"] == hb["history"][-1]["train_loss"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    plain = _model(2)
    hp = train_classifier(plain, (x, y), (x, y), ClassifierTrainConfig.preset("tiny", epochs=2), progress=False)
    assert hp["history"][-1]["train_loss"] != ha["history"][-1]["train_loss"]
    # Adversarial batches only from adv_start_epoch on: starting after the last epoch is plain training.
    late = _model(2)
    hl = train_classifier(late, (x, y), (x, y), ClassifierTrainConfig.preset("tiny", epochs=2, adv_eps=4 / 255,
                                                                             adv_start_epoch=2), progress=False)
    assert [h["train_loss"] for h in hl["history"]] == [h["train_loss"] for h in hp["history"]]
    one = _model(2)
    h1 = train_classifier(one, (x, y), (x, y), ClassifierTrainConfig.preset("tiny", epochs=2, adv_eps=4 / 255,
                                                                            adv_start_epoch=1), progress=False)
    assert h1["history"][0]["train_loss"] == hp["history"][0]["train_loss"]
    assert h1["history"][1]["train_loss"] != hp["history"][1]["train_loss"]
    # Patience 1 would stop a plain run early; it never stops before the adversarial epochs start,
    # and the model kept is an adversarial epoch's.
    pat = ClassifierTrainConfig.preset("tiny", epochs=6, patience=1, adv_eps=4 / 255, adv_start_epoch=4)
    hpat = train_classifier(_model(3), (x, y), (x, y), pat, progress=False)
    assert hpat["epochs_run"] >= 5 and hpat["best_epoch"] >= 4


def test_evaluate_classifier_numbers():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 1 with p = 0.75 for every scan
            return torch.tensor([[0.25, 0.75]]).expand(x.shape[0], 2)

    x = np.zeros((4, 1, 8, 8), np.float32)
    m = evaluate_classifier(Fixed(), x, np.array([1, 1, 1, 0]))
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx((3 * -np.log(0.75) - np.log(0.25)) / 4, rel=1e-6)


def test_train_classifier_learns_is_deterministic_and_calls_hook():
    tr, va = _blobs(48, 2), _blobs(16, 3)
    calls = []

    def hook(x, g):
        calls.append(x.shape[0])
        return x

    cfg = ClassifierTrainConfig.preset("tiny", epochs=4, patience=4)
    m1 = _model()
    h1 = train_classifier(m1, tr, va, cfg, progress=False, augment=hook)
    m2 = _model()
    train_classifier(m2, tr, va, cfg, progress=False)
    assert len(h1["history"]) == 4 and sum(calls) == 4 * 48
    assert h1["val"]["accuracy"] >= 0.75  # the disc is easy to see
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # it trains in channels-last layout on the CPU and hands the model back in the ordinary one, as it came
    assert all(t.is_contiguous() for t in m1.state_dict().values())
    out = train_classifier(m2, tr, va, replace(cfg, epochs=1), progress=False, return_optimizer_state=True)
    assert all(t.is_contiguous() for t in m2.state_dict().values())
    assert all(t.is_contiguous() for t in out["optimizer_state"].values())


def test_channels_last_context_switches_cpu_modules_and_puts_them_back_on_an_error():
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with pytest.raises(RuntimeError, match="inside"):
        with channels_last(conv, bn, object(), None):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
            raise RuntimeError("inside")
    assert conv.weight.is_contiguous() and all(t.is_contiguous() for t in bn.state_dict().values())


def test_channels_last_is_switched_off_by_the_environment_and_refuses_other_values(monkeypatch):
    conv = torch.nn.Conv2d(3, 4, 3)
    monkeypatch.setenv("MEDFEDPURE_CHANNELS_LAST", "0")
    with channels_last(conv):
        assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("MEDFEDPURE_CHANNELS_LAST", "no")
    with pytest.raises(ValueError, match="MEDFEDPURE_CHANNELS_LAST='no'"):
        with channels_last(conv):
            pass
    monkeypatch.setenv("MEDFEDPURE_CHANNELS_LAST", "1")
    with channels_last(conv):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_training_matches_the_ordinary_layout_to_rounding(monkeypatch):
    """One epoch from the same weights in both layouts: the convolutions see channels-last weights only in the
    first, and the trained models give the same scores up to floating-point order."""
    tr, va = _blobs(32, 2), _blobs(16, 3)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=1, patience=2)

    def run(model: torch.nn.Module) -> tuple[set[bool], torch.Tensor]:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        seen: set[bool] = set()
        hook = conv.register_forward_pre_hook(
            lambda mod, _: seen.add(mod.training and mod.weight.is_contiguous(memory_format=torch.channels_last)))
        train_classifier(model, tr, va, cfg, progress=False)
        hook.remove()
        with torch.no_grad():
            return seen, model.eval()(torch.from_numpy(va[0]))

    seen_cl, p_cl = run(_model())
    monkeypatch.setenv("MEDFEDPURE_CHANNELS_LAST", "0")  # the switch, off
    seen_ref, p_ref = run(_model())
    assert True in seen_cl and True not in seen_ref
    assert torch.allclose(p_cl, p_ref, atol=1e-4), float((p_cl - p_ref).abs().max())


def test_resume_equals_uninterrupted(tmp_path):
    """A run killed in epoch 2 and resumed ends with the same weights as an uninterrupted run."""
    tr, va = _blobs(24, 4), _blobs(8, 5)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=2, patience=5)  # batch 8: 3 steps per epoch
    full = _model()
    train_classifier(full, tr, va, cfg, progress=False, checkpoint_dir=tmp_path / "a")
    calls = []

    def crash_in_epoch_2(x, g):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        train_classifier(_model(), tr, va, cfg, progress=False, checkpoint_dir=tmp_path / "b",
                         augment=crash_in_epoch_2)
    assert json.loads((tmp_path / "b" / "classifier.state.json").read_text())["epoch"] == 1
    resumed = _model(seed=9)  # weights come from the checkpoint, not from init
    h = train_classifier(resumed, tr, va, cfg, progress=False, checkpoint_dir=tmp_path / "b", resume=True)
    assert [r["epoch"] for r in h["history"]] == [0, 1]
    from medfedpure.models.weights import load_model

    a = load_model(tmp_path / "a" / "classifier.last.safetensors")[0].state_dict()
    b = load_model(tmp_path / "b" / "classifier.last.safetensors")[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_without_state_raises(tmp_path):
    from medfedpure.models.weights import WeightsError as CheckpointError

    with pytest.raises(CheckpointError, match="cannot resume"):
        train_classifier(_model(), _blobs(8, 0), _blobs(4, 1), ClassifierTrainConfig.preset("tiny"), progress=False,
                         checkpoint_dir=tmp_path, resume=True)


def test_bad_data_raises():
    with pytest.raises(ValueError, match="expected"):
        train_classifier(_model(), (np.zeros((4, 3, 32, 32), np.float32), np.zeros(4)), _blobs(4, 1),
                         ClassifierTrainConfig.preset("tiny"), progress=False)


def test_train_mae_lowers_validation_error():
    torch.manual_seed(0)  # parameter init only
    m = MaskedAutoencoder(MAEConfig.preset("tiny"))
    x, _ = _blobs(32, 6)
    xv, _ = _blobs(8, 7)
    before = evaluate_mae(m, xv)["masked_mse"]
    h = train_mae(m, x, xv, MAETrainConfig.preset("tiny", epochs=3, lr=3e-3), progress=False)
    assert len(h["history"]) == 3
    assert h["val"]["masked_mse"] < before
    with pytest.raises(ValueError, match="expected"):
        train_mae(m, x[:, :, :16, :16], xv, MAETrainConfig.preset("tiny"), progress=False)


def test_cli_train_classifier_and_mae_tiny(tmp_path, monkeypatch):
    from medfedpure.cli import app
    from medfedpure.cli import train as tcli
    from typer.testing import CliRunner

    def fake_split(data, site, split, size):
        return _blobs({"train": 24, "val": 8, "test": 8}[split], {"train": 0, "val": 1, "test": 2}[split], size)

    monkeypatch.setattr(tcli, "load_site_split", fake_split)
    run = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    r = CliRunner().invoke(app, ["train", "classifier", "--data", str(data), "--site", "1", "--out", str(run),
                                 "--config", "tiny", "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (run / "site_1" / "classifier.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classifier/site_1"]["epochs_run"] == 1 and "accuracy" in metrics["classifier/site_1"]["test"]
    r = CliRunner().invoke(app, ["train", "mae", "--data", str(data), "--out", str(run), "--config", "tiny",
                                 "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg) == {"classifier/site_1", "mae"} and cfg["mae"]["train"]["epochs"] == 1
    r = CliRunner().invoke(app, ["train", "classifier", "--data", str(data), "--out", str(run), "--config", "big"])
    assert r.exit_code != 0
    # --adv-eps is in 1/255 units; the preset's adversarial settings otherwise.
    r = CliRunner().invoke(app, ["train", "classifier", "--data", str(data), "--out", str(run), "--adv-eps", "4",
                                 "--adv-start-epoch", "3", "--dry-run"])
    assert r.exit_code == 0, r.output
    train = json.loads(r.output)["train"]
    assert train["adv_eps"] == pytest.approx(4 / 255) and train["adv_start_epoch"] == 3
    r = CliRunner().invoke(app, ["train", "classifier", "--data", str(data), "--out", str(run), "--dry-run"])
    train = json.loads(r.output)["train"]
    assert train["adv_eps"] == pytest.approx(4 / 255) and train["adv_start_epoch"] == 40 and train["epochs"] == 60
    r = CliRunner().invoke(app, ["train", "classifier", "--data", str(data), "--out", str(run), "--adv-eps", "30"])
    assert r.exit_code != 0


def test_cli_train_classifier_stem_and_width(tmp_path, monkeypatch):
    """``--stem`` and ``--width`` reach the MoE config: shown by --dry-run, saved with the trained model."""
    from medfedpure.cli import app
    from medfedpure.cli import train as tcli
    from medfedpure.models.weights import load_model
    from typer.testing import CliRunner

    monkeypatch.setattr(tcli, "load_site_split", lambda data, site, split, size: _blobs(
        {"train": 16, "val": 8, "test": 8}[split], {"train": 0, "val": 1, "test": 2}[split], size))
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    base = ["train", "classifier", "--data", str(data), "--out", str(run), "--config", "tiny"]
    r = CliRunner().invoke(app, [*base, "--stem", "2", "--width", "2", "--dry-run"])
    assert r.exit_code == 0, r.output
    model = json.loads(r.output)["model"]
    assert (model["stem"], model["global_widths"]) == (2, [8, 16])
    r = CliRunner().invoke(app, [*base, "--dry-run"])
    assert json.loads(r.output)["model"]["stem"] == 0  # the default: no stem
    r = CliRunner().invoke(app, [*base, "--stem", "-1", "--dry-run"])
    assert r.exit_code == 2 and "--stem" in r.output
    r = CliRunner().invoke(app, [*base, "--stem", "1", "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    m, mcfg, _ = load_model(run / "site_0" / "classifier.safetensors")
    assert mcfg == MoEConfig.preset("tiny", stem=1) and m.global_expert.stem[0].conv.weight.shape == (4, 1, 3, 3)
