"""Adversarial and denoised-smoothing training of the classifier: attack budgets, losses, selection, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.runtime.certify import sigma_to_t
from medfedpure.runtime.sampler import interp_alpha_bar
from medfedpure.train import classifier as clf
from medfedpure.train.classifier import (
    ClassifierTrainConfig,
    _loss,
    denoised_smoothing_batch,
    nfgsm_batch,
    pgd_batch,
    robust_accuracy,
    trades_adversary,
    trades_loss,
    train_classifier,
)
from medfedpure.train.loop import epoch_generator


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
    torch.manual_seed(seed)
    return MoEClassifier(MoEConfig.preset("tiny"))


def _trained(seed: int = 0) -> MoEClassifier:
    """A tiny model that has learnt the blobs (so the attacks have something to break)."""
    m = _model(seed)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=4, seed=seed)
    train_classifier(m, _blobs(64, 1), _blobs(16, 2), cfg, progress=False)
    return m.eval()


@pytest.mark.parametrize("kw", [dict(adv="madry"), dict(adv_norm="l1"), dict(adv="fgsm-rs", adv_norm="l2", adv_eps=0.5),
                                dict(adv_norm="l2", adv="pgd", adv_eps=9.0), dict(adv="pgd", adv_eps=0.2),
                                dict(adv_steps=0), dict(trades_beta=-1.0), dict(robust_val=-1),
                                dict(select="best"), dict(select="robust", robust_val=0, adv="pgd", adv_eps=0.01),
                                dict(select="robust", robust_val=8, adv="none", adv_eps=0.01),
                                dict(smoothing_sigmas=(0.0,)), dict(smoothing_sigmas=(1.5,)),
                                dict(smoothing_frac=0.0), dict(adv="nfgsm", adv_norm="l2", adv_eps=0.5),
                                dict(adv="nfgsm", adv_eps=0.03, nfgsm_noise=-1.0),
                                dict(smoothing_sigmas=(0.25,), smoothing_frac=0.6, adv="pgd", adv_eps=0.01,
                                     adv_frac=0.5)])
def test_bad_adversarial_config_raises(kw):
    with pytest.raises(ValueError):
        ClassifierTrainConfig.preset("tiny", **kw)


def test_presets_unchanged_by_new_options():
    small = ClassifierTrainConfig.preset("small")
    assert (small.adv, small.adv_eps, small.adv_start_epoch, small.select, small.robust_val) == \
        ("fgsm-rs", 4 / 255, 40, "clean", 0)
    assert small.smoothing_sigmas == () and small.adversarial
    assert not ClassifierTrainConfig.preset("tiny", adv="none", adv_eps=0.03).adversarial
    # a list (from JSON) becomes a tuple of floats
    assert ClassifierTrainConfig(smoothing_sigmas=[0.12, 0.25]).smoothing_sigmas == (0.12, 0.25)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_batch_respects_eps_box_and_fraction(norm, eps):
    m = _trained()
    x, y = (torch.from_numpy(a) for a in _blobs(12, 5))
    x0 = x.clone()
    out = pgd_batch(m, x, y, eps, 5, 0.5, torch.Generator().manual_seed(0), norm=norm)
    assert torch.equal(x, x0)  # pure
    assert out.shape == x.shape and m.training is False
    d = (out - x)[:6].reshape(6, -1)
    if norm == "linf":
        assert float(d.abs().max()) <= eps + 1e-6
    else:
        assert float(d.norm(dim=1).max()) <= eps + 1e-5
    assert float(d.abs().max()) > 0.5 * (eps if norm == "linf" else 1e-3)  # it moved
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[6:], x[6:])  # the clean half untouched


def test_nfgsm_batch_is_noise_plus_one_unclipped_signed_step():
    """N-FGSM: start x + η, η ~ U[−kε, kε] from the caller's generator, then exactly ±ε along the sign of the
    cross-entropy's gradient at the start (reference gradient computed here through ``log_probs``), clipped
    to [0, 1] only — so it leaves the ε-ball (up to (k + 1)ε) where FGSM-RS never does."""
    m = _trained().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = (torch.from_numpy(a) for a in _blobs(12, 5))
    x0 = x.clone()
    eps, k = 8 / 255, 2.0
    out = nfgsm_batch(m, x, y, eps, 0.5, torch.Generator().manual_seed(3), noise=k)
    assert torch.equal(x, x0) and m.training  # pure; the mode restored
    assert all(torch.equal(before[n], v) for n, v in m.state_dict().items())  # no BatchNorm update
    assert torch.equal(out[6:], x[6:])  # the clean half untouched
    assert out.min() >= 0 and out.max() <= 1
    eta = (torch.rand(x[:6].shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * (k * eps)
    start = (x[:6] + eta).clamp(0, 1).requires_grad_(True)
    m.eval()
    (grad,) = torch.autograd.grad(F.nll_loss(m.log_probs(start), y[:6]), start)
    m.train()
    step = out[:6] - start.detach()
    inside = ((start.detach() + eps * grad.sign()) > 0) & ((start.detach() + eps * grad.sign()) < 1) & (grad != 0)
    assert int(inside.sum()) > 0.5 * inside.numel()
    torch.testing.assert_close(step[inside], eps * grad.sign()[inside], atol=1e-6, rtol=0)
    d = (out[:6] - x[:6]).abs()
    assert float(d.max()) <= (k + 1) * eps + 1e-6
    assert float(d.max()) > 2 * eps  # not projected back onto the ε-ball
    again = nfgsm_batch(m, x, y, eps, 0.5, torch.Generator().manual_seed(3), noise=k)
    assert torch.equal(out, again)  # seeded
    # k = 0: no noise, the plain FGSM step of ε
    plain = nfgsm_batch(m, x, y, eps, 1.0, torch.Generator().manual_seed(3), noise=0.0)
    assert float((plain - x).abs().max()) <= eps + 1e-6


def test_nfgsm_training_runs_deterministic_and_differs_from_fgsm_rs():
    x, y = _blobs(24, 4)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=2, adv="nfgsm", adv_eps=8 / 255, robust_val=8,
                                       select="robust")
    a, b = _model(2), _model(2)
    ha = train_classifier(a, (x, y), (x, y), cfg, progress=False)
    hb = train_classifier(b, (x, y), (x, y), cfg, progress=False)
    assert [h["train_loss"] for h in ha["history"]] == [h["train_loss"] for h in hb["history"]]
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    assert "val_robust_accuracy" in ha["history"][0] and ha["robust_val"]["num_scans"] == 8
    rs = ClassifierTrainConfig.preset("tiny", epochs=2, adv="fgsm-rs", adv_eps=8 / 255, robust_val=8,
                                      select="robust")
    hr = train_classifier(_model(2), (x, y), (x, y), rs, progress=False)
    assert hr["history"][-1]["train_loss"] != ha["history"][-1]["train_loss"]


def test_pgd_batch_restores_train_mode_and_keeps_bn_statistics():
    m = _trained().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = (torch.from_numpy(a) for a in _blobs(8, 6))
    pgd_batch(m, x, y, 0.03, 3, 1.0, torch.Generator().manual_seed(1))
    trades_adversary(m, x, 0.03, 3, torch.Generator().manual_seed(1))
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_adversarial_loss_at_least_clean_loss():
    m = _trained()
    cfg = ClassifierTrainConfig.preset("tiny")
    x, y = (torch.from_numpy(a) for a in _blobs(32, 7))
    with torch.no_grad():
        clean = float(F.nll_loss(m.log_probs(x), y))
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        xa = pgd_batch(m, x, y, eps, 10, 1.0, torch.Generator().manual_seed(0), norm=norm)
        with torch.no_grad():
            adv = float(F.nll_loss(m.log_probs(xa), y))
        assert adv >= clean
        assert adv > clean + 1e-3  # a real increase, not a tie
    # and robust accuracy never exceeds clean accuracy on the same scans
    with torch.no_grad():
        acc = float((m.log_probs(x).argmax(1) == y).float().mean())
    rob = robust_accuracy(m, x, y, 8 / 255, 10, "linf", torch.Generator().manual_seed(0))
    assert rob <= acc
    with torch.no_grad():
        mloss = float(_loss(m, x, y, cfg))
    assert mloss > 0


def test_trades_loss_reduces_to_ce_at_beta_zero_and_grows_with_beta():
    m = _trained()
    cfg = ClassifierTrainConfig.preset("tiny")
    x, y = (torch.from_numpy(a) for a in _blobs(16, 8))
    xa = trades_adversary(m, x, 8 / 255, 5, torch.Generator().manual_seed(0))
    assert float((xa - x).abs().max()) <= 8 / 255 + 1e-6
    with torch.no_grad():
        ce = _loss(m, x, y, cfg)
        t0 = trades_loss(m, x, xa, y, cfg, 0.0)
        t6 = trades_loss(m, x, xa, y, cfg, 6.0)
        kl = F.kl_div(m.log_probs(xa), m.log_probs(x).exp(), reduction="batchmean")
    assert torch.equal(t0, ce)
    assert float(kl) > 0
    assert float(t6) == pytest.approx(float(ce) + 6.0 * float(kl), rel=1e-5)


def test_model_selection_keeps_best_robust_val_epoch(monkeypatch):
    """A scripted robust validation (0.2, 0.9, 0.4, 0.6): select='robust' keeps epoch 1's weights."""
    script = iter([0.2, 0.9, 0.4, 0.6])
    snapshots: list[dict[str, torch.Tensor]] = []

    def fake_robust(model, x, y, eps, steps, norm, generator, **kw):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(script)

    monkeypatch.setattr(clf, "robust_accuracy", fake_robust)
    m = _model()
    cfg = ClassifierTrainConfig.preset("tiny", epochs=4, patience=10, adv="pgd", adv_eps=2 / 255, adv_steps=1,
                                       robust_val=8, select="robust")
    out = train_classifier(m, _blobs(32, 1), _blobs(16, 2), cfg, progress=False)
    assert out["best_epoch"] == 1
    assert [round(r["val_robust_accuracy"], 3) for r in out["history"]] == [0.2, 0.9, 0.4, 0.6]
    assert all(torch.equal(v, snapshots[1][k]) for k, v in m.state_dict().items())
    assert out["robust_val"]["accuracy"] == 0.9 and out["robust_val"]["num_scans"] == 8
    assert len(snapshots) == 4  # the kept epoch's figure is read back, not attacked a fifth time
    # clean selection on the same scripted run keeps another epoch's weights
    script2 = iter([0.2, 0.9, 0.4, 0.6, 0.9])
    monkeypatch.setattr(clf, "robust_accuracy", lambda *a, **k: next(script2))
    m2 = _model()
    out2 = train_classifier(m2, _blobs(32, 1), _blobs(16, 2),
                            ClassifierTrainConfig.preset("tiny", epochs=4, patience=10, adv="pgd", adv_eps=2 / 255,
                                                         adv_steps=1, robust_val=8, select="clean"),
                            progress=False)
    accs = [r["val_accuracy"] - 1e-3 * r["val_loss"] for r in out2["history"]]
    assert out2["best_epoch"] == int(np.argmax(accs))


def test_real_robust_val_tracked_and_json_serialisable():
    m = _model()
    cfg = ClassifierTrainConfig.preset("tiny", epochs=2, adv="trades", adv_eps=4 / 255, adv_steps=2, robust_val=8,
                                       select="robust", trades_beta=1.0)
    out = train_classifier(m, _blobs(24, 1), _blobs(16, 2), cfg, progress=False)
    rob = [r["val_robust_accuracy"] for r in out["history"]]
    assert len(rob) == 2 and all(0 <= r <= 1 for r in rob)
    # the result's figure, read back from the kept epoch's row, is what attacking the returned model gives
    xv, yv = (torch.from_numpy(a) for a in _blobs(16, 2))
    sub = clf.robust_val_subset(len(xv), 8, cfg.seed)
    with torch.enable_grad():
        again = clf.robust_accuracy(m.eval(), xv[sub], yv[sub], cfg.adv_eps, cfg.robust_val_steps, cfg.adv_norm,
                                    epoch_generator(cfg.seed, 0, stream=8))
    assert out["robust_val"]["accuracy"] == again == rob[out["best_epoch"]]
    assert all(r["val_robust_accuracy"] <= r["val_accuracy"] + 0.5 for r in out["history"])
    json.dumps(out)


class _RecordingDenoiser(torch.nn.Module):
    """Records its calls; returns x_t / √ᾱ_t (the exact x0 for noise-free inputs)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = table
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.clone(), t.clone()))
        ab = torch.from_numpy(interp_alpha_bar(self.table, t.numpy())).view(-1, 1, 1, 1)
        return x_t / ab.sqrt()


def test_smoothing_calls_denoiser_at_mapped_step():
    from medfedpure.models.diffusion import DiffusionSchedule

    table = DiffusionSchedule().alphas_cumprod.numpy()
    den = _RecordingDenoiser(table)
    x, _ = (torch.from_numpy(a) for a in _blobs(8, 3))
    sigmas = (0.12, 0.25, 0.5)
    out = denoised_smoothing_batch(x, den, table, sigmas, 0.5, torch.Generator().manual_seed(4))
    assert len(den.calls) == 1
    x_t, t = den.calls[0]
    assert x_t.shape == (4, 1, 32, 32) and t.shape == (4,) and t.dtype == torch.float32
    # replay the generator: which σ each scan got, and its noise
    g = torch.Generator().manual_seed(4)
    pick = torch.randint(0, 3, (4,), generator=g)
    eps = torch.randn((4, 1, 32, 32), generator=g)
    sig = torch.tensor([sigmas[int(i)] for i in pick])
    want_t = torch.tensor([sigma_to_t(table, float(s)) for s in sig], dtype=torch.float32)
    assert torch.equal(t, want_t)
    ab = torch.from_numpy(interp_alpha_bar(table, want_t.numpy())).view(4, 1, 1, 1)
    # noise level 2σ in diffusion space: √((1 − ᾱ)/ᾱ) = 2σ
    assert np.allclose(((1 - ab) / ab).sqrt().flatten().numpy(), 2 * sig.numpy(), rtol=1e-4)
    torch.testing.assert_close(x_t, ab.sqrt() * ((x[4:] + sig.view(4, 1, 1, 1) * eps) * 2 - 1))
    assert torch.equal(out[:4], x[:4])
    # this denoiser returns x + σε exactly, so the output is its clip to [0, 1]
    torch.testing.assert_close(out[4:], (x[4:] + sig.view(4, 1, 1, 1) * eps).clamp(0, 1), atol=1e-5, rtol=0)


def test_train_with_smoothing_calls_denoiser_and_requires_one():
    from medfedpure.models.diffusion import DiffusionSchedule

    table = DiffusionSchedule().alphas_cumprod.numpy()
    cfg = ClassifierTrainConfig.preset("tiny", epochs=1, smoothing_sigmas=(0.25,), smoothing_frac=0.25)
    with pytest.raises(ValueError, match="denoiser"):
        train_classifier(_model(), _blobs(16, 1), _blobs(8, 2), cfg, progress=False)
    den = _RecordingDenoiser(table)
    train_classifier(_model(), _blobs(16, 1), _blobs(8, 2), cfg, progress=False, denoiser=den,
                     denoiser_alphas_cumprod=table)
    assert len(den.calls) == 2  # 16 scans, batch 8: one call per batch
    t_want = sigma_to_t(table, 0.25)
    assert all(c[0].shape == (2, 1, 32, 32) and torch.allclose(c[1], torch.full((2,), t_want)) for c in den.calls)
    with pytest.raises(ValueError, match="largest noise level"):
        train_classifier(_model(), _blobs(16, 1), _blobs(8, 2),
                         ClassifierTrainConfig.preset("tiny", epochs=1, smoothing_sigmas=(1.0,)), progress=False,
                         denoiser=den, denoiser_alphas_cumprod=table[:50])


def test_default_recipe_untouched_by_new_options():
    """The fgsm-rs recipe with the new fields at their defaults: the per-epoch training losses that the
    loop gave before the adversarial options existed (same inputs, pinned), and no robust validation."""
    cfg = ClassifierTrainConfig.preset("tiny", epochs=3, adv_eps=4 / 255, adv_start_epoch=1)
    out = train_classifier(_model(), _blobs(24, 1), _blobs(8, 2), cfg, progress=False)
    assert [r["train_loss"] for r in out["history"]] == pytest.approx(
        [1.0204346577326457, 0.9425767262776693, 0.896406908830007], rel=1e-6)
    assert out["best_epoch"] == 2
    assert "robust_val" not in out and "val_robust_accuracy" not in out["history"][0]


def test_cli_adversarial_options(tmp_path, monkeypatch):
    from medfedpure.cli import app
    from medfedpure.cli import train as tcli
    from tiny_bundle import cached_tiny_bundle
    from typer.testing import CliRunner

    def fake_split(data, site, split, size):
        return _blobs({"train": 16, "val": 8, "test": 8}[split], {"train": 0, "val": 1, "test": 2}[split], size)

    monkeypatch.setattr(tcli, "load_site_split", fake_split)
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    base = ["train", "classifier", "--data", str(data), "--out", str(run)]
    # --adv given: robust validation on (128 scans) and used for selection; eps in 1/255 (linf)
    r = CliRunner().invoke(app, [*base, "--adv", "pgd", "--adv-eps", "8", "--adv-steps", "5", "--dry-run"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["train"]
    assert (t["adv"], t["adv_steps"], t["robust_val"], t["select"]) == ("pgd", 5, 128, "robust")
    assert t["adv_eps"] == pytest.approx(8 / 255)
    # l2: --adv-eps is the radius in scan units
    r = CliRunner().invoke(app, [*base, "--adv", "trades", "--adv-norm", "l2", "--adv-eps", "0.5",
                                 "--trades-beta", "3", "--dry-run"])
    t = json.loads(r.output)["train"]
    assert (t["adv"], t["adv_norm"], t["adv_eps"], t["trades_beta"]) == ("trades", "l2", 0.5, 3.0)
    # no --adv: the preset's recipe exactly; --device resolved before any data is read
    r = CliRunner().invoke(app, [*base, "--dry-run", "--device", "auto"])
    t = json.loads(r.output)["train"]
    assert json.loads(r.output)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        r = CliRunner().invoke(app, [*base, "--dry-run", "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA" in r.output and "--device" in r.output
    assert (t["adv"], t["select"], t["robust_val"], t["smoothing_sigmas"]) == ("fgsm-rs", "clean", 0, [])
    r = CliRunner().invoke(app, [*base, "--adv", "nfgsm", "--adv-eps", "8", "--dry-run"])
    t = json.loads(r.output)["train"]
    assert (t["adv"], t["nfgsm_noise"], t["robust_val"], t["select"]) == ("nfgsm", 2.0, 128, "robust")
    for bad in (["--adv", "madry"], ["--adv", "fgsm-rs", "--adv-norm", "l2", "--adv-eps", "0.5"],
                ["--adv", "nfgsm", "--adv-norm", "l2", "--adv-eps", "0.5"],
                ["--smoothing-sigmas", "0.25"], ["--smoothing-sigmas", "0.25,x", "--denoiser", str(data)]):
        r = CliRunner().invoke(app, [*base, *bad, "--dry-run"])
        assert r.exit_code != 0, bad
    # a real tiny run: PGD-AT with smoothing through the tiny bundle's (verified) denoiser
    bundle = cached_tiny_bundle()
    r = CliRunner().invoke(app, [*base, "--config", "tiny", "--epochs", "2", "--adv", "pgd", "--adv-eps", "4",
                                 "--adv-steps", "2", "--robust-val", "8", "--smoothing-sigmas", "0.12,0.25",
                                 "--denoiser", str(bundle), "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((run / "metrics.json").read_text())["classifier/site_0"]
    assert [row["epoch"] for row in m["history"]] == [0, 1] and "val_robust_accuracy" in m["history"][0]
    assert m["robust_val"]["num_scans"] == 8 and m["robust_val"]["eps"] == pytest.approx(4 / 255)
    assert m["history"][m["best_epoch"]]["val_robust_accuracy"] == max(r["val_robust_accuracy"] for r in m["history"])
    # through the purifier: t* and K from the bundle unless given
    from medfedpure.runtime.bundle import verify_bundle

    spec = verify_bundle(bundle, allow_unsigned=True).spec
    r = CliRunner().invoke(app, [*base, "--adv", "pgd", "--adv-eps", "8", "--adv-through-purifier", "--denoiser",
                                 str(bundle), "--dry-run"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["train"]
    assert t["adv_through_purifier"] and t["purifier_t"] == spec.gate.t_min and t["purifier_steps"] == spec.purifier.steps
    r = CliRunner().invoke(app, [*base, "--adv", "pgd", "--adv-eps", "8", "--adv-through-purifier", "--dry-run"])
    assert r.exit_code != 0 and "--denoiser" in r.output
    # a folder that is neither a bundle nor a run
    r = CliRunner().invoke(app, [*base, "--config", "tiny", "--epochs", "1", "--smoothing-sigmas", "0.25",
                                 "--denoiser", str(data), "--no-progress"])
    assert r.exit_code != 0 and "student.safetensors" in r.output


def _tiny_unet():
    from medfedpure.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny")).eval()


def test_through_purifier_attack_box_and_purified_batch():
    from medfedpure.models.diffusion import purify
    from medfedpure.train.classifier import PurifiedClassifier, pgd_through_purifier_batch

    m, den = _trained(), _tiny_unet()
    x, y = (torch.from_numpy(a) for a in _blobs(6, 9))
    cfg = ClassifierTrainConfig.preset("tiny", adv="pgd", adv_eps=8 / 255, adv_steps=2, adv_frac=0.5,
                                       adv_through_purifier=True, purifier_t=60, purifier_eot=2)
    m.train()
    out = pgd_through_purifier_batch(m, x, y, cfg, den, torch.Generator().manual_seed(0))
    assert m.training and not den.training and out.shape == x.shape
    # replay: the same generator gives the attack's scans, then one purification of the whole batch
    g = torch.Generator().manual_seed(0)
    m.eval()
    pc = PurifiedClassifier(m, den, 60, 1, 2, g).eval()
    xadv = pgd_batch(pc, x, y, 8 / 255, 2, 0.5, g)
    assert float((xadv - x).abs().max()) <= 8 / 255 + 1e-6 and torch.equal(xadv[3:], x[3:])
    noise = torch.randn(x.shape, generator=g)
    want = purify(den, xadv, torch.full((6,), 60.0), 1, noise=noise)
    torch.testing.assert_close(out, want)
    assert float((out - x).abs().max()) > 8 / 255  # purification moved the scans beyond the attack's box
    # EOT: log-probs are the log of the mean probability over draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    lp = PurifiedClassifier(m, den, 60, 1, 2, g1).log_probs(x)
    p = torch.stack([m(purify(den, x, torch.full((6,), 60.0), 1, noise=torch.randn(x.shape, generator=g2)))
                     for _ in range(2)]).mean(0)
    torch.testing.assert_close(lp.exp(), p, atol=1e-6, rtol=1e-5)


def test_through_purifier_config_and_training_need_pgd_and_denoiser():
    with pytest.raises(ValueError, match="only adv='pgd'"):
        ClassifierTrainConfig.preset("tiny", adv="trades", adv_eps=0.01, adv_through_purifier=True)
    with pytest.raises(ValueError, match="purifier_t"):
        ClassifierTrainConfig.preset("tiny", purifier_t=0)
    cfg = ClassifierTrainConfig.preset("tiny", epochs=1, adv="pgd", adv_eps=4 / 255, adv_steps=1,
                                       adv_through_purifier=True, purifier_eot=1)
    with pytest.raises(ValueError, match="denoiser"):
        train_classifier(_model(), _blobs(16, 1), _blobs(8, 2), cfg, progress=False)
    out = train_classifier(_model(), _blobs(16, 1), _blobs(8, 2), cfg, progress=False, denoiser=_tiny_unet())
    assert out["epochs_run"] == 1 and np.isfinite(out["history"][0]["train_loss"])


# where training runs (--device) ---------------------------------------------------------------------------

def test_train_device_refusals_come_before_any_work():
    from medfedpure.train.device import DeviceError, resolve_device

    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(DeviceError, match="expected one of cpu, cuda, auto"):
        resolve_device("gpu")
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(DeviceError, match="--device 'tpu'"):
        train_classifier(m, _blobs(16, 1), _blobs(8, 2), ClassifierTrainConfig.preset("tiny", epochs=1),
                         progress=False, device="tpu")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_train_device_auto_on_a_cpu_machine_is_the_cpu_run_bit_for_bit():
    cfg = ClassifierTrainConfig.preset("tiny", epochs=2, adv="pgd", adv_eps=8 / 255, adv_steps=2,
                                       smoothing_sigmas=(0.25,), smoothing_frac=0.25, robust_val=4)
    runs = []
    for device in ("cpu", "auto"):
        m, den = _model(), _tiny_unet()
        out = train_classifier(m, _blobs(16, 1), _blobs(8, 2), cfg, progress=False, denoiser=den,
                               return_optimizer_state=True, device=device)
        runs.append((m, den, out))
    if torch.cuda.is_available():
        pytest.skip("auto is CUDA here: the CPU-only claim does not apply")
    (m0, _, o0), (m1, den1, o1) = runs
    assert [r["train_loss"] for r in o0["history"]] == [r["train_loss"] for r in o1["history"]]
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values(), strict=True))
    assert all(v.device.type == "cpu" for v in o1["optimizer_state"].values())
    assert next(den1.parameters()).device.type == "cpu"


class _Boom(RuntimeError):
    pass


def test_train_device_model_and_denoiser_return_home_on_an_error():
    """The moves are undone in a ``finally``: an error in the user's augment hook still moves both modules
    back to the device they came on (recorded here on the CPU; the CUDA test below checks it on a GPU)."""
    m, den = _model(), _tiny_unet()
    moves: list[tuple[str, str]] = []
    for name, mod in (("model", m), ("denoiser", den)):
        plain = mod.to

        def to(*a, _name=name, _plain=plain, **kw):
            if a or "device" in kw:  # a move (the CPU's channels-last layout switch passes memory_format only)
                moves.append((_name, str(a[0] if a else kw.get("device"))))
            return _plain(*a, **kw)

        mod.to = to  # type: ignore[method-assign]

    def hook(x, g):
        raise _Boom("in the hook")

    cfg = ClassifierTrainConfig.preset("tiny", epochs=1, smoothing_sigmas=(0.25,), smoothing_frac=0.25)
    with pytest.raises(_Boom):
        train_classifier(m, _blobs(16, 1), _blobs(8, 2), cfg, progress=False, augment=hook, denoiser=den,
                         device="cpu")
    assert moves == [("model", "cpu"), ("denoiser", "cpu"), ("model", "cpu"), ("denoiser", "cpu")]
    assert all(t.is_contiguous() for t in m.state_dict().values())  # the layout is put back on the error too


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_cuda_agrees_with_the_cpu_run():
    """The same draws on both devices (CPU generators): a clean run agrees to float order, an adversarial
    run with smoothing batches and robust selection runs end to end and lands near the CPU run; the modules
    come back to the CPU, the optimizer state is on the CPU."""
    clean = ClassifierTrainConfig.preset("tiny", epochs=2)
    outs = {}
    for device in ("cpu", "cuda"):
        m = _model()
        outs[device] = (m, train_classifier(m, _blobs(32, 1), _blobs(16, 2), clean, progress=False, device=device))
    lc = [r["train_loss"] for r in outs["cpu"][1]["history"]]
    lg = [r["train_loss"] for r in outs["cuda"][1]["history"]]
    np.testing.assert_allclose(lg, lc, rtol=1e-3)
    assert next(outs["cuda"][0].parameters()).device.type == "cpu"
    for a, b in zip(outs["cpu"][0].state_dict().values(), outs["cuda"][0].state_dict().values(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), atol=1e-3, rtol=1e-3)
    adv = ClassifierTrainConfig.preset("tiny", epochs=2, adv="pgd", adv_eps=8 / 255, adv_steps=2, robust_val=8,
                                       select="robust", smoothing_sigmas=(0.25,), smoothing_frac=0.25)
    res = {}
    for device in ("cpu", "cuda"):
        m, den = _model(), _tiny_unet()
        res[device] = train_classifier(m, _blobs(32, 1), _blobs(16, 2), adv, progress=False, denoiser=den,
                                       return_optimizer_state=True, device=device)
        assert next(m.parameters()).device.type == "cpu" and next(den.parameters()).device.type == "cpu"
    assert all(v.device.type == "cpu" for v in res["cuda"]["optimizer_state"].values())
    for rc, rg in zip(res["cpu"]["history"], res["cuda"]["history"], strict=True):
        assert abs(rg["train_loss"] - rc["train_loss"]) <= 0.05 * abs(rc["train_loss"]) + 1e-3
    assert abs(res["cuda"]["val"]["accuracy"] - res["cpu"]["val"]["accuracy"]) <= 2 / 16
