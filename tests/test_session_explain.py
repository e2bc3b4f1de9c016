"""'Why this token?' as a person uses it: a typed contrast keeps its leading space, the component table shows
amounts and shares, the page says what its colours and methods mean, a head opens in the Attention tab, and
the attribution charts fit their columns with integrated gradients ticked."""

from __future__ import annotations

import json

import pytest
import vl_convert
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

from explorer_core import explain, frames, models, tracefile
from explorer_core.cli import main as cli_main
from explorer_core.config import GenerationConfig
from explorer_core.stepper import generate
from explorer_ui import explain_view
from tests.apphelp import chart_titles, start, use_model

SUBMIT = "FormSubmitter:gen_explain_form-Explain"


@pytest.fixture(scope="module")
def explained(tiny_llama_dir):
    """The Generate page after one run and one Explain with integrated gradients ticked."""
    at = use_model(start(), tiny_llama_dir, max_new_tokens=4, min_new_tokens=4, seed=3)
    at.button(key="gen_generate").click().run()
    at.checkbox(key="gen_explain_with_ig").check()
    at.number_input(key="gen_explain_ig_steps").set_value(8)
    at.button(key=SUBMIT).click().run()
    assert not at.exception, at.exception
    return at


def _result(at):
    (made,) = at.session_state[explain_view.RESULTS].values()
    return made


def _spaced_pair(tokenizer, chosen: int) -> tuple[str, int, int | None]:
    """A typed text with a leading space that is one token, its id, and the id of the same text unspaced."""
    for word in ("a", "light", "blue"):
        spaced = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        bare = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1 and spaced[0] != chosen:
            return " " + word, spaced[0], bare[0] if len(bare) == 1 else None
    raise AssertionError("the tiny tokenizer has no spaced one-token word")


def test_typed_contrast_keeps_its_leading_space(tiny_llama_dir):
    at = use_model(start(), tiny_llama_dir, max_new_tokens=3, min_new_tokens=3, seed=3)
    at.button(key="gen_generate").click().run()
    trace, _ = at.session_state["gen_trace"]
    tok = models.load(str(tiny_llama_dir)).tokenizer
    text, spaced_id, bare_id = _spaced_pair(tok, trace.steps[0].token_id)
    assert bare_id is not None and bare_id != spaced_id  # " a" and "a" are two tokens: the test can tell them apart
    at.text_input(key="gen_explain_typed").input(text)
    at.button(key=SUBMIT).click().run()
    assert not at.exception, at.exception
    assert at.text_input(key="gen_explain_typed").value == text  # the box keeps what was typed
    made = _result(at)
    assert made.contrast.id == spaced_id and made.contrast.label.startswith("␣")
    shown = " ".join(t.value for t in at.text)
    assert f"over contrast '{made.contrast.label}' (id {spaced_id})" in shown
    assert f"chosen '{made.target.label}' (id {made.target.id})" in shown


def test_cli_contrast_with_a_leading_space(tiny_llama, tiny_llama_dir, tmp_path):
    cfg = GenerationConfig(model=str(tiny_llama_dir), prompt="The sky is", max_new_tokens=3, min_new_tokens=3, seed=1)
    trace = generate(tiny_llama, cfg).trace()
    text, spaced_id, _ = _spaced_pair(tiny_llama.tokenizer, trace.steps[1].token_id)
    path = tracefile.save(trace, None, tmp_path / "trace.json")
    out = tmp_path / "why.json"
    args = ["explain", str(path), "--step", "1", "--contrast", text, "--methods", "grad_x_input", "--out", str(out)]
    assert cli_main(args) == 0
    assert json.loads(out.read_text())["contrast"]["id"] == spaced_id
    assert explain_view._contrast(text, None) == text  # the page hands the same text on, space kept
    assert explain_view._contrast(" 12 ", None) == 12  # ASCII digits are still an id


def test_sentencepiece_text_is_matched_by_its_bytes():
    """A SentencePiece-style tokenizer writes a leading space as "▁": " Paris" is the piece "▁Paris"."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(tok_models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.train_from_iterator(["Paris is big. Paris. Rome and Paris."] * 10, trainers.BpeTrainer(vocab_size=80))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    lm = type("LM", (), {"tokenizer": tok})()
    assert tok.convert_ids_to_tokens([explain.token_for_text(lm, " Paris")]) == ["▁Paris"]
    with pytest.raises(explain.ExplainError, match=r"' Paris is big' is \d+ tokens"):
        explain.token_for_text(lm, " Paris is big")


def test_component_table_shows_amount_and_share(explained):
    made = _result(explained)
    (table,) = [d.value for d in explained.dataframe if "share" in d.value.columns]
    assert list(table.columns) == ["component", "amount", "share"] and len(table) == 10
    parts = {r["component"]: r["amount"] for r in frames.named_components(made)}
    for _, row in table.iterrows():
        assert row["amount"] == pytest.approx(parts[row["component"]])
        assert row["share"] == pytest.approx(row["amount"] / made.logit_diff)
    assert any("share: amount ÷ difference" in c.value for c in explained.caption)


def test_page_says_what_colours_and_methods_mean(explained):
    made = _result(explained)
    captions = " ".join(c.value for c in explained.caption)
    assert "Red: the position pushes towards the chosen token" in captions
    assert "blue: towards the contrast" in captions and "A score is in logits" in captions
    assert "Red: the part raises the chosen token's logit over the contrast's" in captions
    (sums,) = [d.value for d in explained.dataframe if "sum of scores" in d.value.columns]
    assert list(sums["method"]) == [frames.METHOD_NAMES[m] for m in made.inputs.methods]
    for (_, row), scores in zip(sums.iterrows(), made.inputs.methods.values()):
        assert row["sum of scores"] == pytest.approx(sum(scores))
        assert row["logit difference"] == pytest.approx(made.logit_diff)
    said = " ".join(t.value for t in explained.text)
    assert "Not complete" in said and "Nearly complete" in said and "Complete: its sum is f(input)" in said


def test_a_top_head_opens_in_the_attention_tab(explained):
    at = explained
    pick = at.selectbox(key="gen_explain_open_pick")
    head = pick.options[-1]  # the smallest head of the top 10: not simply the first choice
    layer, h = (int(x[1:]) for x in head.split())
    pick.set_value(head).run()
    at.button(key="gen_explain_open").click().run()
    assert not at.exception, at.exception
    assert at.number_input(key="gen_attn_layer").value == layer
    assert at.selectbox(key="gen_attn_head").value == f"head {h}"
    assert at.session_state["gen_tabs"] == "Attention"
    assert _open_tab(at._tree, "gen_tabs") == 1  # what the browser is told to show: the Attention tab
    assert any(f"layer {layer}, head {h}" in t for t in chart_titles(at)), chart_titles(at)


def _png_width(spec: dict, datasets: dict, path) -> int:
    path.write_bytes(vl_convert.vegalite_to_png({**spec, "datasets": datasets}, scale=1))
    return Image.open(path).width


# a third of the main column of a 1,280 px window with the sidebar open (about 850 px), less the gaps
THIRD = 270


def _open_tab(node, key: str) -> int | None:
    proto = getattr(node, "proto", None)
    tabs = getattr(proto, "tab_container", None) if type(proto).__name__ == "Block" else None
    if tabs is not None and proto.HasField("tab_container") and tabs.id.endswith(key):
        return tabs.default_tab_index
    for child in getattr(node, "children", {}).values():
        found = _open_tab(child, key)
        if found is not None:
            return found
    return None


def test_attribution_charts_fit_their_columns(explained, tmp_path):
    """Integrated gradients ticked: three charts side by side, each narrower than its column."""
    drawn = [
        el.proto for el in explained.get("vega_lite_chart") if json.loads(el.proto.spec).get("title") == "Top positions"
    ]
    assert len(drawn) == 3  # one chart per method, integrated gradients included
    for i, proto in enumerate(drawn):
        rows = {
            d.name: json.loads(convert_arrow_bytes_to_pandas_df(d.data.data).to_json(orient="records"))
            for d in proto.datasets
        }
        assert _png_width(json.loads(proto.spec), rows, tmp_path / f"app_{i}.png") <= THIRD
        assert all(len(r) <= explain_view.ATTRIBUTION_BARS for r in rows.values())


def test_long_labels_stay_in_the_column(explained, tmp_path):
    """The widest case: three methods, three-digit positions, long wide tokens (the axis clips them)."""
    made = _result(explained)
    n = 300
    wide = made.inputs.model_copy(
        update={
            "positions": list(range(n)),
            "labels": ["␣WWWWWWWWWWWWWWWWWWWWWWWW"] * n,
            "methods": {m: [(-1) ** i * (i + 0.5) * 1000 for i in range(n)] for m in made.inputs.methods},
        }
    )
    for i, chart in enumerate(explain_view.attribution_charts(made.model_copy(update={"inputs": wide}))):
        spec = chart.to_dict()
        width = _png_width(spec, spec.pop("datasets", {}), tmp_path / f"wide_{i}.png")
        assert width <= THIRD, (i, width)
    two = wide.model_copy(update={"methods": {m: v for m, v in wide.methods.items() if m != "integrated_gradients"}})
    for i, chart in enumerate(explain_view.attribution_charts(made.model_copy(update={"inputs": two}))):
        spec = chart.to_dict()
        width = _png_width(spec, spec.pop("datasets", {}), tmp_path / f"half_{i}.png")
        assert width <= 2 * THIRD * 3 // 4, (i, width)  # half of the same main column, about 410 px
