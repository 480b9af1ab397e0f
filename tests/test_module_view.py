"""The published cards' leaf-module view, and the layer map plot."""

import pytest
from tiny_models import tiny_config

from hf_bwsk.analysis import analyze
from hf_bwsk.analysis.module_view import ModuleView, module_kind
from hf_bwsk.errors import BWSKError
from hf_bwsk.models import load_config


def test_pythia_70m_gives_the_published_40_s_19_k():
    report = analyze(load_config("pythia-70m"), granularity="module")
    view = report.module_view
    assert len(view.leaves) == 59
    assert view.counts() == {"S": 40, "K": 19, "Gray": 0}
    assert round(view.ratios()["S"] * 100, 1) == 67.8 and round(view.ratios()["K"] * 100, 1) == 32.2
    # 13 of the 19 K leaves are Dropout(p=0): identities the op-level analysis skips.
    dropouts = [leaf for leaf in view.leaves if leaf.module_class == "Dropout"]
    assert len(dropouts) == 13 and {leaf.kind for leaf in dropouts} == {"K"}
    assert report.records == [], "the module view needs no trace"
    assert report.ratios("count") == view.ratios()


def test_mamba_130m_gives_86_0_0_14_because_silu_is_unknown():
    view = analyze(load_config("mamba-130m"), granularity="module").module_view
    assert len(view.leaves) == 171
    assert view.counts() == {"S": 147, "K": 0, "Gray": 24}
    assert [round(share * 100, 1) for share in view.ratios().values()] == [86.0, 0.0, 14.0]
    assert {leaf.module_class for leaf in view.leaves if leaf.kind == "Gray"} == {"SiLUActivation"}


@pytest.mark.parametrize(
    "class_name, kind",
    [("Linear", "S"), ("Conv1d", "S"), ("GPTNeoXRotaryEmbedding", "S"), ("LayerNorm", "S"),
     ("MambaRMSNorm", "S"), ("Softplus", "S"), ("Dropout", "K"), ("GELUActivation", "K"), ("ReLU", "K"),
     ("Tanh", "K"), ("Sigmoid", "K"), ("Softmax", "K"), ("SiLUActivation", "Gray"), ("Conv1D", "Gray")],
)
def test_published_rule_table(class_name, kind):
    assert module_kind(class_name) == kind


def test_module_granularity_has_counts_only():
    report = analyze(tiny_config("gpt2"), granularity="module")
    with pytest.raises(BWSKError, match="granularity='op'"):
        report.ratios("bytes")
    assert report.to_table() == report.module_view.to_table()
    assert report.summary()["ratios"] == {"count": report.module_view.ratios()}
    assert ModuleView.from_dict(report.module_view.to_dict()) == report.module_view


def test_layer_map_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = analyze(tiny_config("gpt_neox"), seq_len=8, batch_size=1)
    path = report.plot(tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BWSKError, match="granularity='op'"):
        analyze(tiny_config("gpt_neox"), granularity="module").plot(tmp_path / "none.png")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    report = analyze(tiny_config("gpt_neox"), seq_len=8, batch_size=1)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(BWSKError, match=r"pip install 'hf-bwsk\[plot\]'"):
        report.plot(tmp_path / "map.png")
