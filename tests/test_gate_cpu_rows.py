"""The C++ gate's row-sequential path for the mask-set sums (float32 recon, patch % 8 == 0): strips
read row after row, 8 patches per vector (lane = patch), the remaining side % 8 patches of a strip
per patch, mask sets in groups of up to 4, a set's visible patches computed and blended out. It must
agree bit for bit with the numpy oracle for every stat, batch split and thread count, and the
values of visible patches must never reach a score.
"""

from __future__ import annotations

import numpy as np
import pytest
from medfedpure import gate as ops
from medfedpure.gate import dispatch, patch_gate_reference

pytestmark = pytest.mark.skipif(dispatch._C is None, reason="medfedpure._C is not built")


def _case(seed: int, b: int, k: int, size: int, patch: int, x_dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    x = rng.random((b, size, size), dtype=np.float32)
    noise = rng.standard_normal((b, k, size, size), dtype=np.float32) * np.float32(0.3)
    noise *= rng.random((b, k, 1, 1), dtype=np.float32)
    recon = x[:, None] + noise
    n = (size // patch) ** 2
    vis = rng.random((k, n)) < 0.6
    never = np.flatnonzero(vis.all(axis=0))
    vis[rng.integers(0, k, never.size), never] = False
    return x.astype(x_dtype), recon, vis


def _run(x, recon, vis, kw: dict, threads: int):
    args = {name: value for name, value in kw.items() if name != "return_patch_err"}
    args["stat"] = ops.STATS[args["stat"]]
    return dispatch._C.patch_gate(x, recon, vis, **args, num_threads=threads)


def _kw(patch: int, stat: str, n: int, norm_pix: bool) -> dict:
    topk = {"topk": max(1, n // 5), "hfratio": n // 3}.get(stat, 0)
    return dict(patch=patch, stat=stat, topk=topk, norm_pix=norm_pix and stat != "hfratio", tau=0.05,
                tau_high=0.5, t_min=10, t_max=100, floor=True)


# (size, patch): side = 8 (full groups only), 16, 12 and 14 (a remainder of 4 / 6 patches per strip),
# 9 (one group and one patch), and patch 32 / 24 (more than 8 columns per patch row).
GEOMETRIES = [(64, 8), (128, 8), (96, 8), (224, 16), (72, 8), (256, 32), (192, 24)]


@pytest.mark.parametrize(("size", "patch"), GEOMETRIES)
@pytest.mark.parametrize("stat", ["mean", "topk", "hfratio"])
def test_rows_path_equals_oracle(size: int, patch: int, stat: str) -> None:
    k = 4 if size <= 128 else 3
    x, recon, vis = _case(size * 7 + patch, 3, k, size, patch)
    kw = _kw(patch, stat, vis.shape[1], norm_pix=size % 3 == 0)
    ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
    for threads in (1, 2, 3):
        got = _run(x, recon, vis, kw, threads)
        for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} threads={threads}")


@pytest.mark.parametrize("k", [1, 2, 5, 6, 9])
def test_rows_path_set_groups(k: int) -> None:
    # K > 4 runs the sets in groups of 4: the per-patch sum over the hiding sets must still add them
    # in increasing k.
    x, recon, vis = _case(100 + k, 2, k, 128, 16)
    for stat in ("mean", "hfratio"):
        kw = _kw(16, stat, vis.shape[1], norm_pix=k % 2 == 1)
        ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
        got = _run(x, recon, vis, kw, 2)
        for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} stat={stat}")


@pytest.mark.parametrize("stat", ["mean", "hfratio"])
def test_rows_path_ignores_visible_patches(stat: str) -> None:
    # The row path computes every patch of every set and blends the visible ones out: NaN / inf
    # written into the patches a set shows must not change any output.
    size, patch = 128, 8
    x, recon, vis = _case(7, 3, 4, size, patch)
    kw = _kw(patch, stat, vis.shape[1], norm_pix=False)
    ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
    side = size // patch
    poisoned = recon.copy()
    for kk in range(vis.shape[0]):
        for p in np.flatnonzero(vis[kk]):
            r, c = divmod(int(p), side)
            poisoned[:, kk, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = [np.nan, np.inf][(p + kk) % 2]
    for threads in (1, 2):
        got = _run(x, poisoned, vis, kw, threads)
        for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} threads={threads}")


@pytest.mark.parametrize("b", [1, 3, 5, 9])
def test_rows_path_batches_and_float16_x(b: int) -> None:
    # Odd batches and batches larger than the thread count (strips of several scans shared out), with
    # x as float16 (converted into the strip buffer) and recon float32 (read in place by rows).
    x, recon, vis = _case(40 + b, b, 4, 128, 16, x_dtype="float16")
    kw = _kw(16, "topk", vis.shape[1], norm_pix=True)
    ref = patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
    for threads in (1, 2, 3, 0):
        for _ in range(3):
            got = _run(x, recon, vis, kw, threads)
            for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
                np.testing.assert_array_equal(g, r, err_msg=f"{name} threads={threads}")


def test_repeated_calls_agree_whichever_way_the_pool_runs_them() -> None:
    # The pool times calls of one shape alone and with helpers, then takes the faster way and tries
    # the other every 64th call: runs of 140 calls of one shape (both ways and the tries), with a
    # call of another shape between them (which restarts the timing), must all give the oracle's
    # answer.
    a = _case(5, 4, 4, 128, 8)
    b = _case(6, 3, 4, 64, 16)
    kws = [_kw(8, "mean", a[2].shape[1], norm_pix=False), _kw(16, "hfratio", b[2].shape[1], norm_pix=False)]
    refs = [patch_gate_reference(*case, return_patch_err=True, **kw) for case, kw in zip((a, b), kws, strict=True)]
    for i in range(300):
        case, kw, ref = (b, kws[1], refs[1]) if i % 150 == 149 else (a, kws[0], refs[0])
        got = _run(*case, kw, 2)
        for name, g, r in zip(("score", "flag", "t_star", "patch_err"), got, ref, strict=True):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} call {i}")
