"""Packaging a vendor can live with: missing extras, option choices, piped tables, one progress style."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from medfedpure.cli import app, common
from medfedpure.progress import progress
from typer.testing import CliRunner

runner = CliRunner()
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "sdk" / "medfedpure" / "bundles" / "default"


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str, forget: tuple[str, ...] = ()) -> None:
    """Make ``import m`` fail for each module (as on an install without it); drop cached package
    modules that imported them, so they are imported again."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    for name in [n for n in sys.modules if n.startswith(forget)] if forget else []:
        monkeypatch.delitem(sys.modules, name)


def _one_line_extra(res, extra: str) -> None:
    assert res.exit_code == 2, res.output
    line = f"error: this command needs the '{extra}' extra: pip install 'medfedpure[{extra}]'"
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(line), res.output
    assert "Traceback" not in res.output


# -- 1. missing extras -------------------------------------------------------------------------------

def test_demo_without_scipy_names_the_demo_extra(monkeypatch, tmp_path):
    # The core install's failure: demo → synthetic_scans → data.anatomy.load_anatomy → scipy.ndimage.
    _block(monkeypatch, "scipy")
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    _one_line_extra(res, "demo")
    assert "'scipy'" in res.output and not (tmp_path / "demo").exists()


def test_demo_without_torch_names_the_demo_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "torch")
    _one_line_extra(runner.invoke(app, ["demo", "--out", str(tmp_path / "d")]), "demo")


def test_train_without_torch_names_the_train_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "torch")
    res = runner.invoke(app, ["train", "classifier", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                              "--config", "tiny", "--dry-run"])
    _one_line_extra(res, "train")


def test_calibrate_without_torch_names_the_train_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "torch")
    res = runner.invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(tmp_path)])
    _one_line_extra(res, "train")


def test_fed_without_flwr_names_the_fed_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "flwr", "ray", forget=("medfedpure.fed.sim", "medfedpure.fed.strategies",
                                                "medfedpure.fed.server", "medfedpure.fed.client"))
    res = runner.invoke(app, ["fed", "sim", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                              "--sites", "2", "--config", "tiny"])
    _one_line_extra(res, "fed")


def test_export_without_onnx_names_the_export_extra(monkeypatch, tmp_path):
    _block(monkeypatch, "onnx", "onnxscript", forget=("medfedpure.export",))
    res = runner.invoke(app, ["export", "--run", str(tmp_path), "--site", "0", "--out", str(tmp_path / "b")])
    _one_line_extra(res, "export")


def test_serve_without_fastapi_names_the_serve_extra(monkeypatch):
    _block(monkeypatch, "fastapi")
    _one_line_extra(runner.invoke(app, ["serve", "--port", "0"]), "serve")
    _block(monkeypatch, "uvicorn")
    _one_line_extra(runner.invoke(app, ["serve", "--port", "0"]), "serve")


def test_extra_for_maps_modules_and_prefers_the_command_extra():
    assert common.extra_for("torch") == "torch"
    assert common.extra_for("torch", "demo") == "demo"
    assert common.extra_for("scipy.ndimage") == "train"
    assert common.extra_for("scipy", "demo") == "demo"
    assert common.extra_for("flwr.serverapp") == "fed"
    assert common.extra_for("onnx") == "export"
    assert common.extra_for("onnx", "fed") == "export"  # fed does not provide onnx
    assert common.extra_for("fastapi") == "serve"
    assert common.extra_for("tensorrt") == "tensorrt"
    assert common.extra_for("medfedpure._C") is None


def test_extras_match_pyproject():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(common.EXTRA_MODULES) <= set(extras)
    demo = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in extras["demo"]}
    assert demo == {"torch", "nilearn", "scipy", "matplotlib"}  # nibabel comes with nilearn


def test_a_non_optional_missing_module_keeps_its_traceback():
    with pytest.raises(ModuleNotFoundError), common.extra_required("demo"):
        raise ModuleNotFoundError("No module named 'medfedpure._C'", name="medfedpure._C")


def test_every_command_is_guarded():
    def walk(t):
        for c in t.registered_commands:
            yield c.callback
        for g in t.registered_groups:
            yield from walk(g.typer_instance)

    callbacks = list(walk(app))
    assert len(callbacks) >= 15 and all(getattr(cb, "_extras_guarded", False) for cb in callbacks)


def _command_paths(t, prefix=()):
    for c in t.registered_commands:
        yield (*prefix, c.name or c.callback.__name__.replace("_", "-"))
    for g in t.registered_groups:
        yield from _command_paths(g.typer_instance, (*prefix, g.name))


def test_every_command_prints_its_help():
    # rich renders option help as markup: a bracketed "[/x]" in a help text crashes --help
    paths = list(_command_paths(app))
    assert len(paths) >= 20
    for path in paths:
        r = CliRunner().invoke(app, [*path, "--help"], terminal_width=120)
        assert r.exit_code == 0, (path, r.output[-500:])
        assert "Usage:" in r.output


def test_no_help_text_is_taken_for_rich_markup():
    """rich reads "[word …]" in a help text as a markup tag and prints nothing for it (bundle build's help lost
    "[federated attack detector → learned gate]", calibrate's "[t_min, T]"): no command's or option's help may
    hold one (rich's own tag pattern; an escaped "\\[" is fine)."""
    import re

    import click
    import typer.main

    tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")

    def walk(cmd, path=()):
        yield path, cmd.help or ""
        for p in cmd.params:
            yield (*path, p.name), getattr(p, "help", None) or ""
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))

    texts = list(walk(typer.main.get_command(app)))
    assert len(texts) > 200
    bad = [(where, m) for where, text in texts for m in tag.findall(text)]
    assert not bad, bad
    assert tag.findall("narrow it to [t_min, T]") == ["[t_min, T]"] and not tag.findall("an escaped \\[x]")


# -- 3. choices --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "valid"), [
    (["run", "x.png", "--backend", "onnx"], "'onnxruntime'"),
    (["run", "x.png", "--device", "gpu"], "'cuda'"),
    (["run", "x.png", "--policy", "always"], "'floor'"),
    (["demo", "--backend", "trt"], "'tensorrt'"),
    (["certify", "x.png", "--backend", "ort"], "'onnxruntime'"),
    (["serve", "--policy", "never"], "'adaptive'"),
    (["serve", "--log-level", "loud"], "'debug'"),
    (["train", "classifier", "--data", ".", "--out", "r", "--config", "large"], "'small'"),
    (["calibrate", "--data", ".", "--run", ".", "--stat", "max"], "'hfratio'"),
    (["calibrate", "--data", ".", "--run", ".", "--policy", "x"], "'floor'"),
    (["fed", "sim", "--data", ".", "--out", "r", "--config", "medium"], "'tiny'"),
    (["fed", "sim", "--data", ".", "--out", "r", "--strategy", "fedprox"], "'krum'"),
    (["fed", "sim", "--data", ".", "--out", "r", "--classifier-split", "none"], "'fedbn'"),
    (["bundle", "build", "--preset", "huge", "--dry-run"], "'small'"),
])
def test_bad_choice_is_refused_with_the_valid_values(args, valid):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Invalid value" in res.output and valid in res.output.replace("\n", " ")


def test_choices_equal_the_library_values():
    from medfedpure.build.config import PRESETS as BUILD_PRESETS
    from medfedpure.gate.validate import STATS
    from medfedpure.runtime.defender import POLICIES
    from medfedpure.runtime.engines import BACKENDS, DEVICES

    assert common.BACKENDS == BACKENDS and common.DEVICES == DEVICES and common.POLICIES == POLICIES
    assert common.PRESETS == BUILD_PRESETS and set(common.STATS) == set(STATS)
    from medfedpure.cli.train import CONFIGS

    assert common.PRESETS == CONFIGS
    pytest.importorskip("flwr")
    from medfedpure.fed.params import SPLITS
    from medfedpure.fed.phases import PRESETS as FED_PRESETS
    from medfedpure.fed.strategies import STRATEGIES

    assert common.STRATEGIES == STRATEGIES and common.PRESETS == tuple(FED_PRESETS)
    assert set(common.CLASSIFIER_SPLITS) == set(SPLITS) - {"none"}


def test_a_valid_choice_still_runs(tmp_path):
    res = runner.invoke(app, ["bundle", "build", "--preset", "tiny", "--dry-run", "--work", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert '"preset": "tiny"' in res.output


@pytest.mark.parametrize(("args", "named"), [
    (["--calibration-confidence", "1"], "calibration_confidence=1.0"),
    (["--target-ffr", "0"], "calibration_target_ffr=0.0"),
    (["--target-ffr", "1.5"], "calibration_target_ffr=1.5"),
])
def test_bundle_build_refuses_a_calibration_it_cannot_run(tmp_path, args, named):
    res = runner.invoke(app, ["bundle", "build", "--preset", "tiny", "--dry-run", "--work", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert named in res.output.replace("\n", " ")


def test_bundle_build_calibration_options_reach_its_config(tmp_path):
    res = runner.invoke(app, ["bundle", "build", "--preset", "tiny", "--dry-run", "--work", str(tmp_path),
                              "--target-ffr", "0.07", "--calibration-confidence", "0.9"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["calibration_target_ffr"], cfg["calibration_confidence"]) == (0.07, 0.9)


# -- 4. piped tables ---------------------------------------------------------------------------------

def test_piped_verify_bundle_keeps_full_names_and_hash_prefixes():
    from medfedpure.runtime.bundle import verify_bundle

    vb = verify_bundle(DEFAULT_BUNDLE)
    res = runner.invoke(app, ["verify-bundle", str(DEFAULT_BUNDLE)])  # stdout is not a terminal here
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(ln) for ln in lines) > 80  # rich's default width when piped would cut at 80
    for a in vb.artefacts.values():
        row = [ln for ln in lines if f" {a.name} " in ln and a.sha256[:16] in ln]
        assert len(row) == 1, (a.name, res.output)
        assert a.path in row[0] and f"{a.bytes:,}" in row[0]


def test_console_width_when_piped_and_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert common.console().width >= common.PIPED_WIDTH

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setenv("COLUMNS", "100")
    assert common.console().width == 100


# -- 5. one progress style ---------------------------------------------------------------------------

def test_progress_in_a_log_is_plain_lines():
    out = io.StringIO()
    bar = progress(total=20, desc="train", unit="epoch", stream=out)
    for i in range(20):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # one per tenth of the total
    assert lines[0] == "train: 2/20 epoch loss=0.50" and lines[-1] == "train: 20/20 epoch loss=0.05"


def test_progress_iterable_unknown_total_disabled_and_transient():
    out = io.StringIO()
    assert list(progress(iter(range(5)), desc="x", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == "x: 5 it\n"  # unknown total: one line at the end
    out = io.StringIO()
    assert sum(progress(range(7), desc="x", enabled=False, stream=out)) == 21 and out.getvalue() == ""
    with progress(total=3, transient=True, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="total=-1"):
        progress(total=-1)


def test_progress_on_a_terminal_draws_a_rich_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with progress(total=4, desc="rounds", unit="round", stream=out) as bar:
        assert bar.interactive
        bar.set(4)
    assert "rounds" in out.getvalue() and "4/4" in out.getvalue()
    out = Tty()  # a description or postfix with brackets (a scan's path) is printed as it is, not read as markup
    with progress(total=2, desc="scans/[site a]/x.png", unit="draw", stream=out) as bar:
        bar.set_postfix(best="[b]")
        bar.set(2)
    assert "scans/[site a]/x.png" in out.getvalue() and "best=[b]" in out.getvalue(), out.getvalue()


def test_training_loop_writes_no_carriage_return_when_not_a_tty(capfd):
    torch = pytest.importorskip("torch")
    from medfedpure.train.loop import fit

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = fit(model, opt, train_epoch=lambda e: {"train_loss": 1.0 / (e + 1)}, validate=lambda: {"val_acc": 0.5},
               epochs=3, patience=5, monitor="val_acc", mode="max", model_cfg=None, kind="moe", name="clf",
               progress=True)
    err = capfd.readouterr().err
    assert hist["epochs_run"] == 3
    assert "\r" not in err and "clf: 3/3 epoch" in err
