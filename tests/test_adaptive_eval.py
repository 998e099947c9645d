"""medfedpure.eval.adaptive (the rungs behind ``medfedpure eval``): the full-pipeline attack (rung 2) stays in its ball, is reproducible, and
the unbounded sanity check of docs/evaluation.md breaks the defence on the tiny bundle; the evasion attack
(rung 3a) uses the deployed gate statistic, stays in its ball and reports exactly the scans that evade."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from medfedpure import Defender
from medfedpure.runtime.engines.torch_engine import TorchEngine
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ae():
    from medfedpure.eval import adaptive

    return adaptive


@pytest.fixture(scope="module")
def setup():
    d = Defender.load(cached_tiny_bundle(), backend="onnxruntime", device="cpu", threads=1)
    ref = TorchEngine(d.bundle, device="cpu")
    for m in ref.models.values():
        m.requires_grad_(False)
    x = torch.from_numpy(tiny_scans(6, 5))
    with torch.no_grad():
        y = ref.models["classifier"](x).argmax(1)  # the labels the tiny model gives: clean accuracy 1
    return d, ref, x, y


def test_pipeline_pgd_stays_in_the_ball_and_is_reproducible(ae, setup) -> None:
    d, ref, x, y = setup
    eps = 4 / 255
    a, st = ae.pipeline_pgd(d, ref, x, y, eps, steps=3, eot=2, seed=1, progress=False)
    b, _ = ae.pipeline_pgd(d, ref, x, y, eps, steps=3, eot=2, seed=1, progress=False)
    assert a.shape == x.shape and torch.equal(a, b)
    assert float((a - x).abs().max()) <= eps + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert 0.0 <= st["flagged_at_last_step"] <= 1.0
    assert float((a - x).abs().max()) > eps / 2  # it moved


def test_unbounded_attack_breaks_the_defence(ae, setup) -> None:
    """The sanity check of docs/evaluation.md: with ε = 1 the defended accuracy falls to ~0."""
    d, ref, x, y = setup
    clean = ae.defended(d, x.numpy(), y.numpy(), repeats=2, seed=0)
    assert clean["defended_acc_mean"] > 0.5
    xa, _ = ae.pipeline_pgd(d, ref, x, y, 1.0, steps=10, eot=1, seed=0, progress=False)
    r = ae.defended(d, xa.numpy(), y.numpy(), repeats=2, seed=0)
    assert r["defended_acc_mean"] <= 0.2, r
    assert 0 <= r["defended_acc_worst_of_repeats"] <= r["defended_acc_mean"] + 1e-9


# rung 3 (a): detector-aware evasion --------------------------------------------------------------

def test_attack_statistic_equals_the_gate_oracle(ae) -> None:
    """The attack's differentiable gate statistic (the gate's torch version, as rung 3 calls it) is the
    deployed one: the oracle of medfedpure.gate, to float rounding."""
    from medfedpure.gate import GateSpec, run_gate

    rng = np.random.default_rng(3)
    s, p, k = 64, 8, 4
    vis = rng.random((k, (s // p) ** 2)) < 0.3
    vis[0, vis.all(axis=0)] = False
    x = rng.random((5, 1, s, s), dtype=np.float32)
    recon = np.clip(x + 0.1 * rng.standard_normal((5, k, s, s), dtype=np.float32), 0, 1).astype(np.float32)
    for m in (1, 25, 32, 64):
        spec = GateSpec(stat="hfratio", patch=p, topk=m, norm_pix=False, tau=1.0, tau_high=2.0, t_min=0, t_max=10)
        ref = run_gate(spec, x[:, 0], recon, vis, backend="reference").score
        xt = torch.from_numpy(x).requires_grad_(True)
        got = run_gate(spec, xt[:, 0], torch.from_numpy(recon), vis, backend="torch").score
        np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, err_msg=f"m={m}")
        (grad,) = torch.autograd.grad(got.sum(), xt)
        assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_evasion_pgd_stays_in_the_ball_and_under_the_threshold(ae, setup) -> None:
    _, ref, x, y = setup
    d = Defender.load(cached_tiny_bundle(), backend="onnxruntime", device="cpu", threads=1)
    # the tiny bundle's own gate ('mean' statistic): the evasion differentiates the torch MAE and stays in its ball
    m, _ = ae.evasion_pgd(d, ref, x, y, 8 / 255, steps=2, progress=False)
    assert float((m - x).abs().max()) <= 8 / 255 + 1e-6 and float((m - x).abs().max()) > 0
    # the tiny bundle's gate made an hfratio gate, τ above every clean score
    eng = d.engine
    eng.gate_spec = dataclasses.replace(eng.gate_spec, stat="hfratio", topk=8)
    clean = eng.to_numpy(eng.gate(eng.to_native(x.numpy()), eng.mae(eng.to_native(x.numpy()))).score)
    eng.gate_spec = dataclasses.replace(eng.gate_spec, tau=float(clean.max()) * 1.3, tau_high=float(clean.max()) * 2)
    g = eng.gate_spec
    eps = 32 / 255  # the tiny model's scans are noise-like: a large ε so that some evade
    a, st = ae.evasion_pgd(d, ref, x, y, eps, steps=8, factor=2, progress=False)
    b, _ = ae.evasion_pgd(d, ref, x, y, eps, steps=8, factor=2, progress=False)
    assert torch.equal(a, b) and a.shape == x.shape  # deterministic (no random start)
    assert float((a - x).abs().max()) <= eps + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a - x).abs().max()) > eps / 4  # it moved
    assert st["evasion_factor"] == 2 and 0 <= st["evading_and_wrong_during_attack"] <= 1
    # exactly the scans the attack reports as evading are, by the deployed gate, under 0.95 τ and misclassified
    gate = d.engine.gate(d.engine.to_native(a.numpy()), d.engine.mae(d.engine.to_native(a.numpy())))
    score = d.engine.to_numpy(gate.score)
    with torch.no_grad():
        wrong = (ref.models["classifier"](a).argmax(1) != y).numpy()
    evading = (score < 0.95 * g.tau) & wrong
    assert 0 < evading.sum() == round(st["evading_and_wrong_during_attack"] * len(x))
    with pytest.raises(ValueError, match="divide"):
        ae.evasion_pgd(d, ref, x, y, eps, steps=1, factor=5, progress=False)


def test_evasion_under_the_floor_policy_goes_through_the_purifier(ae, setup) -> None:
    _, ref, x, y = setup
    d = Defender.load(cached_tiny_bundle(), backend="onnxruntime", device="cpu", threads=1, policy="floor")
    d.engine.gate_spec = dataclasses.replace(d.engine.gate_spec, stat="hfratio", topk=8, tau=10.0, tau_high=20.0)
    # nothing flagged; floor: all purified
    assert (ae.gate_t_star(d, x.numpy()) == d.engine.gate_spec.t_min).all()
    a, st = ae.evasion_pgd(d, ref, x, y, 8 / 255, steps=2, eot=2, seed=3, progress=False)
    b, _ = ae.evasion_pgd(d, ref, x, y, 8 / 255, steps=2, eot=2, seed=3, progress=False)
    assert torch.equal(a, b)  # the purifier's noise comes from the seeded generator
    assert float((a - x).abs().max()) <= 8 / 255 + 1e-6
    r = ae.defended(d, a.numpy(), y.numpy(), repeats=1, seed=0)
    assert r["flag_rate"] == 0.0 and r["_correct"].shape == (1, len(x))
    adaptive = Defender(d.bundle, d.engine, policy="adaptive")  # nothing flagged → no purification in the loss
    c, _ = ae.evasion_pgd(adaptive, ref, x, y, 8 / 255, steps=2, eot=2, seed=3, progress=False)
    assert not torch.equal(a, c)


def test_transfer_evasion_uses_only_the_surrogate(ae, setup) -> None:
    """Rung 6 (b): in the ball, deterministic, and a function of the surrogate alone (no Defender)."""
    _, ref, x, y = setup
    sur = ref.models["classifier"]
    from medfedpure.gate import GateSpec

    gate = GateSpec(stat="hfratio", patch=8, topk=8, norm_pix=False, tau=1.0, tau_high=2.0, t_min=0, t_max=10)
    kw = dict(steps=4, gate=gate, factor=2)
    a = ae.transfer_evasion(sur, x, y, 8 / 255, **kw)
    assert torch.equal(a, ae.transfer_evasion(sur, x, y, 8 / 255, **kw))
    assert float((a - x).abs().max()) <= 8 / 255 + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a - x).abs().max()) > 8 / 255 / 4
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2), torch.nn.Softmax(dim=1))
    torch.nn.init.constant_(other[1].weight, 0.01)
    assert not torch.equal(a, ae.transfer_evasion(other, x, y, 8 / 255, **kw))  # another surrogate, another attack


def test_pipeline_module_and_torchattacks_apgd(ae, setup) -> None:
    """Rung 4: the wrapped pipeline gives the classifier's answer on unpurified rows and a purified answer
    on the others; torchattacks' APGD on it stays in the ℓ∞ ball."""
    d, ref, x, y = setup
    mod = ae.PipelineModule(d, ref, seed=0)
    ts = ae.gate_t_star(d, x.numpy())
    assert 0 < (ts > 0).sum() < len(ts)  # the tiny bundle's τ sits among these scans' scores: both paths
    with torch.no_grad():
        logp = mod(x)
        plain = torch.log(ref.models["classifier"](x).clamp_min(1e-12))
    assert logp.shape == (len(x), 2) and torch.allclose(logp.exp().sum(1), torch.ones(len(x)), atol=1e-5)
    keep = torch.from_numpy(ts == 0)
    torch.testing.assert_close(logp[keep], plain[keep])
    assert not torch.allclose(logp[~keep], plain[~keep])
    xa = ae.apgd_pipeline(d, ref, x, y, 4 / 255, steps=3, eot=2, seed=0)
    assert xa.shape == x.shape and float((xa - x).abs().max()) <= 4 / 255 + 1e-6
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1


def test_error_statistic_gate_in_torch_equals_the_deployed_gate(setup) -> None:
    """Rung 3 on an error-statistic gate ('mean', the tiny bundle's) differentiates the torch MAE: its score is
    the deployed engine's, and its gradient reaches x."""
    from medfedpure.gate import run_gate

    d, ref, x, _ = setup
    eng = d.engine
    deployed = eng.to_numpy(eng.gate(eng.to_native(x.numpy()), eng.mae(eng.to_native(x.numpy()))).score)
    xv = x.clone().requires_grad_(True)
    score = run_gate(eng.gate_spec, xv[:, 0], ref.models["mae"](xv), eng.visible, backend="torch").score
    np.testing.assert_allclose(score.detach().numpy(), deployed, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(score.sum(), xv)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_apgd_dlr_is_probed_not_assumed(ae) -> None:
    """torchattacks' DLR loss reads the third-largest logit: refused (with the reason) for two classes only."""
    why = ae.apgd_dlr_unsupported(2)
    assert why is not None and "IndexError" in why and "2 classes" in why
    assert ae.apgd_dlr_unsupported(3) is None
