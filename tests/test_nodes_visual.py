"""LRS visualizer pieces without ComfyUI: risk reduction, the picture, the summary, token labels."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import load_pack  # noqa: E402
from pytest import approx  # noqa: E402

PACK = load_pack()
from saferope_pack.nodes.lrs_plot import MAX_ROWS, PlotInput, colour, render, select_rows, to_image_tensor  # noqa: E402
from saferope_pack.nodes.risk import RiskCollector  # noqa: E402
from saferope_pack.nodes.summary import Setting, summarize  # noqa: E402
from saferope_pack.nodes.tokens import token_labels  # noqa: E402
from test_nodes_patch import layer, make_adapter  # noqa: E402


def risk(B: int, n: int, L: int, hot: dict[int, float], gated: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rho, gate)`` of ``(B, n, L)`` scores: 0.1 everywhere but the ``hot`` tokens of head 0."""
    rho = torch.full((B, n, L), 0.1)
    for t, v in hot.items():
        rho[:, 0, t] = v
    g = torch.zeros(B, n, L, dtype=torch.bool)
    for t in gated:
        g[:, 0, t] = True
    return rho, g


def add(sink, lay, kind, idx, stream, rho_gate, txt_len, rotated=True):
    for which in ("q", "k"):  # the same scores for queries and keys
        sink.add(lay, kind, idx, stream, which, *rho_gate, txt_len=txt_len, rotated=rotated)


def collected(layers, T=6, N=12):
    sink = RiskCollector()
    a = layers[0]
    add(sink, a, "double", 1, "txt", risk(2, 2, T, {2: 0.9, 3: 0.6}, {2}), T)
    add(sink, a, "double", 1, "img", risk(2, 2, N, {4: 0.8}, {4}), 0)
    add(sink, a, "single", 0, "joint", risk(2, 2, T + N, {2: 0.95, T + 5: 0.7}, {2, T + 5}), T)
    for extra in layers[1:]:
        add(sink, extra, "double", 1, "joint", risk(2, 2, T + N, {2: 0.9}, {2}), T, rotated=False)
    return sink


def test_report_merges_stream_parts_and_counts_shares():
    lay = layer()
    rep = collected([lay]).report([lay])
    assert [c.label for c in rep.columns] == ["d1", "s0"] and (rep.txt_len, rep.img_len) == (6, 12)
    d1, s0 = rep.columns
    assert float(d1.txt_rho[2]) == approx(0.9) and bool(d1.txt_gated[2]) and not bool(d1.txt_gated[3])
    assert abs(d1.txt_gated_share - 1 / 12) < 1e-6  # one token of six, one head of two
    assert abs(float(d1.img_share[4]) - 0.5) < 1e-6 and float(s0.img_share[5]) == 0.5
    assert rep.image_share().shape == (12,) and float(rep.token_max()[2]) == approx(0.95)


def test_layers_are_lettered_and_an_unrotated_layer_gates_nothing():
    a, b = layer(), layer(make_adapter(seed=3))
    rep = collected([a, b]).report([a, b])
    assert [c.label for c in rep.columns] == ["A:d1", "A:s0", "B:d1"]
    assert float(rep.columns[2].txt_rho[2]) == approx(0.9) and not rep.columns[2].txt_gated.any()


def test_sink_keeps_only_the_first_call():
    lay = layer()
    sink = collected([lay])
    sink.close()
    add(sink, lay, "double", 1, "joint", risk(1, 2, 18, {0: 1.0}, {0}), 6)
    assert float(sink.report([lay]).columns[0].txt_rho[0]) == approx(0.1)


def test_kinds_without_text_or_image_tokens_leave_their_cells_empty():
    """Z-Image's refiners see one stream: a text-only column has no image share, an image-only one no text risk."""
    lay = layer()
    sink = RiskCollector()
    add(sink, lay, "double", 1, "txt", risk(1, 2, 6, {2: 0.9}, {2}), 6)  # text stream only
    add(sink, lay, "single", 0, "img", risk(1, 2, 12, {3: 0.8}, {3}), 0)  # image stream only
    rep = sink.report([lay])
    d1, s0 = rep.columns
    assert (rep.txt_len, rep.img_len) == (6, 12)
    assert float(d1.txt_rho[2]) == approx(0.9) and float(d1.img_share.sum()) == 0.0
    assert bool(s0.txt_rho.isnan().all()) and float(s0.img_share[3]) == 0.5
    assert float(rep.token_max()[2]) == approx(0.9)
    img = render(rep, PlotInput("t", "s", [f"w{i}" for i in range(6)], (3, 4), 0.5))
    assert img.mode == "RGB"


def test_render_is_a_readable_rgb_picture_that_marks_threshold_and_gating():
    lay = layer()
    rep = collected([lay]).report([lay])
    p = PlotInput("title", "subtitle", [f"w{i}" for i in range(6)], (3, 4), 0.3)
    img = render(rep, p)
    assert img.mode == "RGB" and img.width > 400 and img.height > 200
    other = render(rep, PlotInput("title", "subtitle", p.labels, (3, 4), 0.8))
    assert img.tobytes() != other.tobytes()  # the threshold marker moved
    t = to_image_tensor(img)
    assert t.shape == (1, img.height, img.width, 3) and t.dtype == torch.float32 and 0.0 <= float(t.min()) < float(t.max()) <= 1.0
    empty = render(type(rep)([], 0, 0), p)
    assert empty.width > 100


def test_rows_drop_padding_then_keep_the_riskiest_in_order():
    labels = [f"t{i}" for i in range(80)] + ["<pad>"] * 200
    tok = torch.zeros(280)
    tok[[5, 70, 79]] = 1.0
    rows = select_rows(labels, tok)
    assert len(rows) == MAX_ROWS and rows == sorted(rows) and {5, 70, 79} <= set(rows) and max(rows) < 80
    assert select_rows(["a", "b"], torch.zeros(2)) == [0, 1]
    assert colour(0.0) != colour(1.0) and colour(2.0) == colour(1.0)


def test_summary_names_max_risk_top_tokens_and_shares():
    a, b = layer(), layer(make_adapter(seed=3), start_percent=0.5, end_percent=1.0, sigma_start=0.5, sigma_end=0.0)
    rep = collected([a, b]).report([a, b])
    labels = ["<s>", "a", "tomato", "red", "car", "</s>"]
    text = summarize(rep, [a, b], labels, Setting(0.0, 1.0, 512, 256, "labels from the 't5xxl' tokens"))
    assert "max text risk 0.950 at token #2 'tomato' in block A:s0" in text
    assert "top tokens: #2 'tomato' 0.950 (gated), #3 'red' 0.600" in text
    assert "text tokens gated in any block: 1 of 6" in text
    assert "A:d1 8.3% / 4.2%" in text and "B:d1 0.0% / 0.0%" in text
    assert "B: adapter test.safetensors" in text and "INACTIVE" in text and "512x256" in text


class FakeHF:
    """The part of a Hugging Face tokenizer ComfyUI's SD tokenizers wrap (``.tokenizer``)."""

    vocab = {1: "▁a", 2: "▁tomato", 3: "▁red", 0: "<pad>", 9: "</s>"}

    def convert_ids_to_tokens(self, i):
        return self.vocab[i]


class FakeCLIP:
    """A CLIP as ComfyUI's ``CLIP.tokenize(text, return_word_ids=True)`` presents it for FLUX."""

    class Tokenizer:
        class Sub:
            tokenizer = FakeHF()

        t5xxl = Sub()
        clip_l = Sub()

    tokenizer = Tokenizer()

    def tokenize(self, text, return_word_ids=False):
        return {"l": [[(1, 1.0, 1), (2, 1.0, 2)]], "t5xxl": [[(1, 1.0, 1), (2, 1.0, 2), (3, 1.0, 3), (9, 1.0, 0)]]}


def test_token_labels_pick_the_stream_of_the_conditionings_length():
    labels, note = token_labels(FakeCLIP(), "a tomato red", 4)
    assert labels == ["a", "tomato", "red", "</s>"] and "t5xxl" in note
    labels, note = token_labels(FakeCLIP(), "a tomato red", 2)  # only the CLIP-L stream has 2 tokens
    assert labels == ["a", "tomato"] and "'l'" in note
    labels, note = token_labels(FakeCLIP(), "a tomato red", 7)
    assert labels is None and "t5xxl: 4" in note
    assert token_labels(None, "a", 4)[0] is None and token_labels(FakeCLIP(), "  ", 4)[0] is None
