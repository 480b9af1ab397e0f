"""The HTML report: a single self-contained page, from the API, the CLI, and rendered by Chromium."""

import re
import shutil
import subprocess
from html import escape

import pytest
from PIL import Image
from tiny_models import tiny_config

from hf_bwsk.analysis import analyze, calm_report
from hf_bwsk.analysis.html import COLOURS, render_html, save_html
from hf_bwsk.cli import main

PLAN = {"policy": "analysis", "kept_bytes_estimate": 1234, "recompute_flops_fraction": 0.05,
        "recomputed_ops": {"mlp.act:aten.gelu.default": 2, "mixer:aten.bmm.default per step": 2},
        "skipped_ops": {"mixer.out_proj:aten.mm.default": 2},
        "recomputed_loop_steps": {"mixer:aten.bmm.default per step": 15}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def mamba():
    report = analyze(tiny_config("mamba"), seq_len=17, batch_size=3)
    return report, calm_report(report)


def test_page_holds_every_section(mamba):
    report, calm = mamba
    page = render_html(report, calm, PLAN)
    for heading in ("S / K / Gray shares", "Per-layer S/K map", "CALM: phases and sync points per axis",
                    "Tensor-parallel sharding plan (hidden axis)", "Recompute plan", "Ops and their reasons"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "loop over the sequence in backbone.layers.0.mixer" in page
    assert "2 collective(s) per layer" in page and "(upper bound)" in page
    assert "mlp.act:aten.gelu.default" in page
    assert "<td>mixer:aten.bmm.default per step</td><td class=num>2</td><td class=num>15</td>" in page
    assert "<td>mixer.out_proj:aten.mm.default</td><td class=num>2</td>" in page  # skipped: neither kept nor recomputed
    # One cell per logical op of each layer in the S/K map, plus one per logical op of layer 0 per CALM axis.
    cells = page.count("class=cell")
    layer_ops = sum(len(report.layer_records(layer)) for layer in range(report.num_layers))
    assert cells == layer_ops + 3 * len([r for r in calm.records if r.layer == 0])
    for reason in {record.reason for record in report.logical_records}:
        assert escape(reason) in page, reason


def test_page_is_self_contained(mamba, tmp_path):
    path = save_html(tmp_path / "report.html", *mamba)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)\s*=|@import|url\(", page), "nothing to fetch"
    assert "<script" not in page
    assert "Recompute plan" not in page, "no plan given, no plan section"


def test_cli_writes_the_html_report(tmp_path, capsys):
    tiny_config("gpt2").save_pretrained(tmp_path / "model")
    target = tmp_path / "report.html"
    assert main(["analyze", str(tmp_path / "model"), "--seq-len", "16", "--batch-size", "1", "--html", str(target)]) == 0
    assert f"HTML report saved to {target}" in capsys.readouterr().out
    assert "Tensor-parallel sharding plan" in target.read_text(encoding="utf-8")


def test_cli_html_bad_input_fails_before_the_analysis(tmp_path, capsys):
    assert main(["analyze", "gpt2", "--html", str(tmp_path / "missing" / "r.html")]) == 2
    assert "the directory of --html" in capsys.readouterr().err
    assert main(["analyze", "gpt2", "--granularity", "module", "--html", str(tmp_path / "r.html")]) == 2
    assert "--html maps the traced ops" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def chromium(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *arguments], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_report(mamba, tmp_path):
    path = save_html(tmp_path / "report.html", *mamba, PLAN)
    dom = chromium(tmp_path, "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("Per-layer S/K map", "Tensor-parallel sharding plan", "layer 1", "all-reduce", "Recompute plan"):
        assert text in dom.stdout, text
    shot = tmp_path / "report.png"
    run = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", "--hide-scrollbars", path.as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    present = {colour for _, colour in colours}
    for kind, hex_colour in COLOURS.items():
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in present, f"no {kind} cell ({hex_colour}) drawn in the screenshot"


def test_cli_default_sizes_trace_once(monkeypatch, capsys):
    # Without --seq-len/--batch-size the sizes are rounded up to ones that identify the axes, so
    # the CALM report reuses the trace instead of tracing again at probe sizes.
    from hf_bwsk.analysis import calm as calm_module

    def no_second_trace(source):
        raise AssertionError("calm_report traced again")

    monkeypatch.setattr(calm_module, "_probe_trace", no_second_trace)
    assert main(["analyze", "pythia-70m"]) == 0
    out = capsys.readouterr().out
    shape = re.search(r"batch (\d+) x sequence (\d+), traced on meta", out).groups()
    assert int(shape[1]) >= 128 and f"traced at batch {shape[0]} x sequence {shape[1]}" in out
