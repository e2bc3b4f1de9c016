"""The architecture zoo: every tiny model of tests/zoo.py, windows shorter than the sequence, checked
against transformers' own references (tests/zoo_check.py). Each feature is exact or refused by the
fidelity check with a reason; a traceback or a differing number fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from explorer_core import models
from explorer_core.stepper import check_fidelity
from tests import zoo, zoo_check


@pytest.mark.parametrize("name", zoo.NAMES)
def test_architecture_is_faithful_or_refused(name):
    row = zoo_check.check(name, window=zoo.SPECS[name].window)
    assert row["tokens"] == "exact", row  # every architecture in the zoo generates as generate() does
    for feature in ("attention", "lens", "explain", "branch"):
        assert row[feature].startswith(("exact", "refused: ")), (feature, row)
        assert row[feature] != "refused: ", (feature, row)


@pytest.mark.parametrize("name", [n for n in zoo.NAMES if "sliding" in zoo.SPECS[n].family][:3])
def test_windows_wider_than_the_sequence(name):
    row = zoo_check.check(name, window=None)
    assert row["tokens"] == "exact" and row["attention"].startswith("exact"), row


def test_encoder_decoder_refused_at_load(tmp_path):
    name = next(n for n, s in zoo.SPECS.items() if "encoder_decoder" in s.family)
    with pytest.raises(models.ModelLoadError, match="encoder-decoder"):
        models.load(str(zoo.save(name, tmp_path / name)))
    model, tok = zoo.make(name)
    with pytest.raises(models.ModelLoadError, match="encoder-decoder"):
        models.LoadedModel.wrap(model, tok)


def test_folder_errors_say_why(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        models.load(str(empty))
    folder = zoo.save("llama", tmp_path / "noweights")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(models.ModelLoadError, match="safetensors"):
        models.load(str(folder))


def test_loading_by_folder_keeps_the_models_own_implementation(tmp_path):
    """gpt-oss declares sdpa unsupported (its sinks): loaded by folder it must run eager, sinks kept."""
    lm = check_fidelity(models.load(str(zoo.save("gpt_oss", tmp_path / "gpt_oss"))))
    assert models.capture.native_of(lm.model) == "eager"
    assert lm.fidelity.get("tokens").ok and lm.fidelity.get("attention").ok


def test_fidelity_result_is_read_back_from_its_cache_file(tiny_llama_dir, monkeypatch):
    """A later load of the same weights (a new process) reads the check's file instead of probing again."""
    from explorer_core import fidelity

    first = check_fidelity(models.load(str(tiny_llama_dir))).fidelity
    fidelity._memo.clear()
    monkeypatch.setattr(fidelity, "_probe", lambda *a: (_ for _ in ()).throw(AssertionError("probed again")))
    again = check_fidelity(models.load(str(tiny_llama_dir))).fidelity
    assert again.to_dict() == first.to_dict()


def test_fidelity_cache_folder_stays_bounded(tmp_path):
    from explorer_core import fidelity

    for i in range(fidelity.CACHE_FILES + 5):
        (tmp_path / f"{i}.json").write_text("{}")
    fidelity._prune(tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == fidelity.CACHE_FILES


@pytest.mark.parametrize("name", ["gemma2", "lfm2", "mamba", "bloom"])
def test_app_generates_on_architectures_by_folder(name, tmp_path):
    """As a user would: a saved folder typed in the sidebar, Generate, the views below; a refused feature is a
    sentence on the page (attention of an attention-free model), never an exception."""
    from tests.apphelp import start, use_model

    at = use_model(start(), zoo.save(name, tmp_path / name), max_new_tokens=40, min_new_tokens=40, chat=False)
    at.button(key="gen_generate").click().run()
    assert not at.exception, at.exception
    errors = " ".join([e.value for e in at.error] + [t.value for t in at.text])  # the reason is plain text
    lm = check_fidelity(models.load(str(tmp_path / name)))
    if lm.fidelity.refusal("attention"):  # the sidebar records attention by default: refused in words
        assert "attention refused by the fidelity check" in errors and "turn attention capture off" in errors
        at.get_by_key("sidebar_capture_attention").set_value(False).run()
        at.button(key="gen_generate").click().run()
        assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("Fidelity check" in x.label for x in at.expander)


def test_app_attention_of_a_hybrid_names_its_layers_without_attention(tmp_path):
    """LFM2 has convolution layers 0 and 2: the attention view opens on its attention layer, and picking a
    convolution layer says so instead of drawing zeros."""
    from tests.apphelp import start, use_model

    at = use_model(start(), zoo.save("lfm2", tmp_path / "lfm2"), max_new_tokens=8, min_new_tokens=8, logit_lens=False)
    at.button(key="gen_generate").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    layer = next(w for w in at.number_input if w.key.endswith("_layer"))
    assert layer.value == 1
    layer.set_value(0).run()
    assert any("Layer 0 has no attention weights" in i.value for i in at.info)
    assert any("Layers without attention weights" in t.value for t in at.text)


def test_app_states_a_sink_row_sum(tmp_path):
    """gpt-oss's softmax also covers a learned sink: its rows are kept as they are and the page says so."""
    from tests.apphelp import start, use_model

    at = use_model(start(), zoo.save("gpt_oss", tmp_path / "gpt_oss"), max_new_tokens=4, min_new_tokens=4)
    at.button(key="gen_generate").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert any("went outside the sequence, to the layer's attention sink" in c.value for c in at.caption)


def test_the_check_leaves_no_recording_behind(tiny_llama_dir):
    """The probe records attention into temporary companions; none may stay in the temp folder."""
    import tempfile

    from explorer_core import fidelity
    from explorer_core.recorder import TEMP_PREFIX
    from explorer_core.stepper import Run

    def ours() -> set:
        return {p.name for p in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*")}

    before = ours()
    lm = models.load(str(tiny_llama_dir))
    assert fidelity.check(lm, Run, use_disk=False).get("attention").ok
    assert ours() == before
