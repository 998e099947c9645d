"""The deployed defence as a differentiable function, for the attacks of the ladder (docs/evaluation.md).

The attacked function is the one a ``Defender`` computes, from the bundle's own weights:

    x ─► deployed gate (the Defender's engine: MAE scorer + calibrated statistic) ─► t*(x)
      ─► purify(x, t*, noise) (``models.diffusion.purify`` on the bundle's torch denoiser; rows with
         t* = 0 pass unchanged, bit-exact) ─► classifier ─► probabilities

The gate's decision t*(x) is discrete: it is taken from the deployed engine and held constant within a
step (no gradient through the threshold). With the Defender's keyed noise (:func:`keyed_noise`, the
same Philox stream as ``Defender.run``) :func:`keyed_forward` reproduces a Defender's answer — gate
score, flag, t*, purified image and probabilities — from the torch reference; the tests pin that.
Tensors stay on the reference engine's device (CPU or CUDA, ``medfedpure eval --device``); the gate's
decisions come from the deployed engine as host arrays and are copied to that device.

Losses (:func:`attack_objective`, per scan, to be maximised): ``ce`` is the cross-entropy of the true
label; ``margin`` is ``max_{j≠y} log p_j − log p_y`` (a Carlini–Wagner margin on log-probabilities),
which keeps a useful gradient where the cross-entropy saturates. :func:`eot_gradient` is the
expectation-over-transformation gradient: the mean of the per-draw gradients of the loss over
``eot`` independent purification noises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from medfedpure.models.diffusion import purify
from medfedpure.runtime.defender import purification_noise

if TYPE_CHECKING:
    from medfedpure import Defender
    from medfedpure.runtime.engines.torch_engine import TorchEngine

__all__ = ["LOSSES", "NORMS", "gate_t_star", "gate_decision", "keyed_noise", "pipeline_probs", "keyed_forward",
           "attack_objective", "eot_noise", "eot_gradient", "project", "ascent_step"]

LOSSES = ("ce", "margin")
NORMS = ("linf", "l2")


def gate_decision(d: Defender, x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """The deployed gate on x [N, 1, S, S] float32: ``score`` [N] float64, ``flag`` [N] bool, ``t_star``
    [N] int64 (the Defender's engine and policy)."""
    score, flag, t_star = [], [], []
    eng = d.engine
    for i in range(0, len(x), batch):
        xn = eng.to_native(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        g = eng.gate(xn, eng.gate_input(xn), policy=d.policy)
        score.append(eng.to_numpy(g.score).astype(np.float64))
        flag.append(eng.to_numpy(g.flag).astype(bool))
        t_star.append(eng.to_numpy(g.t_star).astype(np.int64))
    return {"score": np.concatenate(score), "flag": np.concatenate(flag), "t_star": np.concatenate(t_star)}


def gate_t_star(d: Defender, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """t* [N] int64 of the deployed gate (the Defender's engine: MAE scorer, or the attack detector of a
    ``learned`` gate, + calibrated statistic)."""
    return gate_decision(d, x, batch)["t_star"]


def keyed_noise(seeds: list[int] | np.ndarray, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """[N, 1, S, S] float32 on ``device``: the purification noise a Defender draws for scans keyed ``seeds``
    (numpy Philox on the host, then copied: the same noise on every device)."""
    return torch.from_numpy(np.stack([purification_noise(int(s), size) for s in seeds])).to(device)


def pipeline_probs(ref: TorchEngine, x: torch.Tensor, t_star: torch.Tensor, *, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """classifier(purify(x, t*)) [B, C], differentiable in x [B, 1, S, S]; rows with t* = 0 go to the
    classifier unchanged. ``noise`` [B, 1, S, S] (e.g. :func:`keyed_noise`) or fresh draws from
    ``generator``."""
    clf, den = ref.models["classifier"], ref.models["denoiser"]
    xp = purify(den, x, t_star, ref.steps, noise=noise, generator=generator, schedule=ref.schedule)
    return clf(xp)


def keyed_forward(d: Defender, ref: TorchEngine, x: np.ndarray, seeds: list[int]) -> dict[str, np.ndarray]:
    """What ``d.run_array(x, seeds=seeds)`` computes, on the torch reference: gate ``score``, ``flag``,
    ``t_star`` (the deployed gate), ``purified`` [N, 1, S, S] and ``probs`` [N, C]."""
    g = gate_decision(d, x)
    dev = ref.torch_device
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    with torch.no_grad():
        xp = purify(ref.models["denoiser"], xt, torch.from_numpy(g["t_star"]).to(dev), ref.steps,
                    noise=keyed_noise(seeds, x.shape[-1], dev), schedule=ref.schedule)
        p = ref.models["classifier"](xp)
    return {**g, "purified": xp.cpu().numpy(), "probs": p.cpu().numpy().astype(np.float64)}


def attack_objective(probs: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Per-scan loss [B] to maximise: ``ce`` (−log p_y) or ``margin`` (max_{j≠y} log p_j − log p_y)."""
    logp = torch.log(probs.clamp_min(1e-12))
    if loss == "ce":
        return F.nll_loss(logp, y, reduction="none")
    if loss == "margin":
        true = logp.gather(1, y[:, None])[:, 0]
        other = logp.masked_fill(F.one_hot(y, logp.shape[1]).bool(), float("-inf")).max(dim=1).values
        return other - true
    raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")


def eot_noise(x: torch.Tensor, eot: int, generator: torch.Generator) -> torch.Tensor:
    """[eot·B, 1, S, S]: the ``eot`` purifier noises that ``eot`` sequential :func:`purify` calls on x
    [B, 1, S, S] would draw from ``generator``, stacked draw after draw (for one batched call)."""
    return torch.cat([torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for _ in range(eot)])


def eot_gradient(ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, t_star: torch.Tensor, *, eot: int,
                 generator: torch.Generator, loss: str = "ce", batched: bool | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """EOT gradient [B, 1, S, S] of the summed per-scan loss, and the mean loss [B]: the mean over ``eot``
    purifier noise draws (from ``generator``) of each draw's gradient.

    ``batched`` (None: on CUDA tensors) runs the ``eot`` draws as one batch of ``eot·B`` scans instead of
    ``eot`` passes of B: the same noise, drawn from ``generator`` in the same order, so the same gradient
    up to the order of floating-point sums; on a GPU it is one launch sequence instead of ``eot``. The
    default keeps the CPU's sequential sums, bit for bit.
    """
    if eot < 1:
        raise ValueError(f"eot={eot}: expected >= 1 noise draws per step")
    if batched is None:
        batched = x.device.type == "cuda"
    xv = x.detach().clone().requires_grad_(True)
    if batched:
        probs = pipeline_probs(ref, xv.repeat(eot, 1, 1, 1), t_star.repeat(eot), noise=eot_noise(x, eot, generator))
        total = (attack_objective(probs, y.repeat(eot), loss) / eot).view(eot, len(x)).sum(0)
    else:
        total = torch.zeros(len(x), device=x.device)
        for _ in range(eot):
            per = attack_objective(pipeline_probs(ref, xv, t_star, generator=generator), y, loss)
            total = total + per / eot
    (grad,) = torch.autograd.grad(total.sum(), xv)
    return grad, total.detach()


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(len(t), -1).norm(dim=1).reshape(-1, 1, 1, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the ε-ball around x (ℓ∞: clip; ℓ2: rescale δ) intersected with [0, 1]."""
    if norm == "linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    if norm == "l2":
        delta = x_adv - x
        return (x + delta * torch.clamp(eps / (_norms(delta) + 1e-12), max=1.0)).clamp(0, 1)
    raise ValueError(f"norm={norm!r}: expected one of {NORMS}")


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """One steepest-ascent step of length α: sign step (ℓ∞) or normalised gradient (ℓ2)."""
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    if norm == "l2":
        return x_adv + alpha * grad / (_norms(grad) + 1e-12)
    raise ValueError(f"norm={norm!r}: expected one of {NORMS}")


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A uniform start in the ℓ∞ ball, or a random direction at radius ε·u (u ~ U(0, 1)) in the ℓ2 ball;
    drawn on ``generator``'s device (x's, see :func:`medfedpure.eval.device.attack_generator`)."""
    dev = generator.device
    if norm == "linf":
        return (x + (torch.rand(x.shape, generator=generator, device=dev).to(x.device) * 2 - 1) * eps).clamp(0, 1)
    d = torch.randn(x.shape, generator=generator, device=dev).to(x.device)
    r = torch.rand((len(x), 1, 1, 1), generator=generator, device=dev).to(x.device)
    return project(x + d / (_norms(d) + 1e-12) * r * eps, x, eps, norm)
