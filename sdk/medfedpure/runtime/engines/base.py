"""The one small interface every inference backend implements.

An :class:`Engine` runs the three shipped networks and the gate on *native* arrays (numpy for
onnxruntime and TensorRT; torch tensors on the engine's device for torch), so that on a GPU the
intermediate tensors never leave the device: the Defender converts once at the start
(:meth:`Engine.to_native`) and reads back only what it must (flags, final probabilities).

Purification defaults to the numpy sampler (:func:`medfedpure.runtime.sampler.purify_numpy`)
around the engine's ``denoise``; the torch engine runs :func:`medfedpure.models.diffusion.purify`
on its device instead. The ᾱ table and K come from the bundle manifest's ``purifier`` section.
The noise is an *input*: the Defender draws it from the keyed RNG, so every backend purifies
with bit-identical noise and a decision can be replayed.

Interrupts: the Defender runs each stage of a call with a time budget under an :class:`Interrupt`
(:func:`run_interruptible`) and sets it at the deadline. A backend that can stop a computation in
progress reads :func:`current_interrupt` and registers a hook (onnxruntime: ``RunOptions.terminate``);
the others finish the stage in the background while the call has already returned.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import numpy as np

from medfedpure.gate import LEARNED_STATS, GateResult, GateSpec, run_gate, run_gate_scores
from medfedpure.runtime.sampler import purify_numpy


class EngineError(RuntimeError):
    """A backend cannot be created or used as asked (missing runtime, provider or artefact)."""


class Interrupt:
    """The stop signal of one stage call: set once (by the caller, at its deadline), never cleared.

    Hooks registered with :meth:`add_hook` run when it is set (immediately when it already is), from
    the setting thread; they must be quick and must not raise.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._hooks: list[Callable[[], None]] = []

    @property
    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def add_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.append(hook)
            already = self._set
        if already:
            hook()

    def remove_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)


_CURRENT_INTERRUPT: ContextVar[Interrupt | None] = ContextVar("medfedpure_interrupt", default=None)
_T = TypeVar("_T")


def current_interrupt() -> Interrupt | None:
    """The :class:`Interrupt` of the stage call running in this thread (None outside one)."""
    return _CURRENT_INTERRUPT.get()


def run_interruptible(interrupt: Interrupt, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` with ``interrupt`` as :func:`current_interrupt` (for a worker thread)."""
    token = _CURRENT_INTERRUPT.set(interrupt)
    try:
        return fn(*args)
    finally:
        _CURRENT_INTERRUPT.reset(token)


class Engine(ABC):
    """A backend: the three networks + the gate, on native arrays.

    Attributes:
        name: ``"onnxruntime"``, ``"torch"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda"`` — the device really in use.
        precision: ``"fp32"`` or ``"fp16"`` — of the purifier/MAE/classifier graphs in use.
        gate_spec: the bundle's calibrated gate (:class:`medfedpure.gate.GateSpec`).
    """

    name: str = "engine"
    device: str = "cpu"
    precision: str = "fp32"
    #: ``classify`` may run in a second thread while ``mae`` runs (the runtime releases the GIL and
    #: its sessions are safe to call from two threads); the Defender then classifies every scan
    #: speculatively alongside the detector and keeps that answer when nothing is purified.
    overlap_classify: bool = False

    def __init__(self, gate: GateSpec, visible: np.ndarray, alphas_cumprod: np.ndarray, steps: int) -> None:
        if not isinstance(gate, GateSpec):
            raise TypeError(f"gate must be a GateSpec (the bundle's calibrated gate), got {type(gate).__name__}: "
                            "pass bundle.spec.gate, or GateSpec.from_dict(manifest['gate'])")
        self.gate_spec = gate
        self.visible = np.asarray(visible, dtype=bool)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.steps = int(steps)

    # array plumbing ------------------------------------------------------------------------
    def to_native(self, a: np.ndarray) -> Any:
        return a

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def take(self, a: Any, idx: np.ndarray) -> Any:
        """Rows ``idx`` (int array) of a native batch."""
        return a[idx]

    def put(self, a: Any, idx: np.ndarray, rows: Any) -> Any:
        """A copy of ``a`` with rows ``idx`` replaced by ``rows``."""
        out = a.copy()
        out[idx] = rows
        return out

    def finite_rows(self, a: Any) -> np.ndarray:
        """bool [B]: rows of a native batch with only finite values."""
        arr = self.to_numpy(a)
        return np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)

    # stages --------------------------------------------------------------------------------
    @abstractmethod
    def mae(self, x: Any) -> Any:
        """x [B,1,S,S] in [0,1] → recon [B,K,S,S] (MAE under its K scoring mask sets)."""

    @abstractmethod
    def denoise(self, x_t: Any, t: Any) -> Any:
        """(x_t [B,1,S,S], t [B] float32) → x0_hat [B,1,S,S] ([−1,1] space)."""

    @abstractmethod
    def classify(self, x: Any) -> Any:
        """x [B,1,S,S] in [0,1] → probs [B,C]."""

    def detect(self, x: Any) -> Any:
        """x [B,1,S,S] in [0,1] → the attack detector's patch logits [B,Np] (bundles whose gate is ``learned``)."""
        raise EngineError(f"the {self.name} engine has no attack detector for this bundle (its gate statistic is "
                          f"{self.gate_spec.stat!r})")

    @property
    def gate_model(self) -> str:
        """The network the gate reads: ``"detector"`` for a ``learned`` gate, else ``"mae"``."""
        return "detector" if self.gate_spec.stat in LEARNED_STATS else "mae"

    def gate_input(self, x: Any) -> Any:
        """What the gate reads of x [B,1,S,S]: the MAE's reconstructions [B,K,S,S], or for a ``learned`` gate the
        detector's patch logits [B,Np]."""
        return self.detect(x) if self.gate_model == "detector" else self.mae(x)

    def gate(self, x: Any, recon: Any, *, return_patch_err: bool = False, policy: str | None = None) -> GateResult:
        """The gate with the bundle's :class:`GateSpec`: x [B,1,S,S] and what :meth:`gate_input` gave (recon
        [B,K,S,S] for the fused gate, :func:`medfedpure.gate.run_gate`; patch logits [B,Np] for a ``learned``
        gate, :func:`medfedpure.gate.run_gate_scores`) native → :class:`GateResult` of native arrays (score,
        flag, t_star, patch_err: the patch errors, ratios or logits). ``policy`` overrides the calibrated policy
        for this call (``"adaptive"`` / ``"floor"``; None: the bundle's)."""
        spec = self.gate_spec if policy is None else self.gate_spec.with_policy(policy)
        if self.gate_model == "detector":
            r = run_gate_scores(spec, recon)
            return r if return_patch_err else r._replace(patch_err=None)
        return run_gate(spec, x[:, 0], recon, self.visible, return_patch_err=return_patch_err)

    def purify(self, x: Any, t_star: Any, noise: np.ndarray) -> Any:
        """Purify rows of x at their t* with the given noise (see :func:`purify_numpy`)."""
        return purify_numpy(lambda y, t: self.to_numpy(self.denoise(y, t)), self.to_numpy(x),
                            self.to_numpy(t_star).astype(np.int64), noise, self.alphas_cumprod, self.steps)

    def describe(self) -> dict[str, Any]:
        """What is really running (for Results, logs and benchmarks)."""
        return {"backend": self.name, "device": self.device, "precision": self.precision}
