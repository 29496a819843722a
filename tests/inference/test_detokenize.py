"""IncrementalDecoder (real tokenizer, no model) and StopSequenceFilter (no tokenizer at all)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from app.inference.detokenize import IncrementalDecoder, StopSequenceFilter


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


def _push_all(tokenizer, ids: list[int]) -> list[str]:
    dec = IncrementalDecoder(tokenizer)
    return [dec.push(i) for i in ids]


# ---- IncrementalDecoder -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld 日本語 🚀",
        "🚀🚀 naïve café — 東京タワー ✓ ok",
        "plain ascii, with punctuation: a , b ? c .",
        "  leading spaces and\nnew lines\n\n\ttabs",
    ],
)
def test_incremental_pieces_concatenate_to_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = _push_all(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    # A piece is never half a character.
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_holds_partial_utf8_until_complete(tokenizer):
    text = "日本語 🚀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The tokenizer splits these characters into byte tokens that do not decode alone.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = _push_all(tokenizer, ids)
    # Some tokens release nothing (half a character) and the text comes out later, whole.
    assert "" in pieces
    released = [p for p in pieces if p]
    assert "".join(released) == text
    assert "🚀" in released[-1]


def test_incremental_skips_special_tokens(tokenizer):
    ids = tokenizer("hi there", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pieces = _push_all(tokenizer, [ids[0], eos, *ids[1:]])
    assert pieces[1] == ""
    assert "".join(pieces) == "hi there"


def test_incremental_trailing_incomplete_char_is_not_released(tokenizer):
    ids = tokenizer("ok 🚀", add_special_tokens=False)["input_ids"]
    pieces = _push_all(tokenizer, ids[:-1])  # the emoji's last byte never arrives
    assert "".join(pieces) == "ok"


# ---- StopSequenceFilter -------------------------------------------------------------------


def _run_filter(stops: tuple[str, ...], texts: list[str], flush: bool = True):
    """Feed texts as tokens 0..n-1; returns (released pieces by index, hit index or None)."""
    f = StopSequenceFilter(stops)
    released: list[tuple[int, str]] = []
    hit_at = None
    for i, text in enumerate(texts):
        out, hit = f.feed(i, text)
        released.extend(out)
        if hit:
            hit_at = i
            break
    if hit_at is None and flush:
        released.extend(f.flush())
    return released, hit_at


def test_no_stops_is_pass_through():
    f = StopSequenceFilter(())
    for i, text in enumerate(["a", "STOP", "", "b"]):
        assert f.feed(i, text) == ([(i, text)], False)
    assert f.flush() == []


def test_empty_stop_strings_are_ignored():
    f = StopSequenceFilter(("",))
    assert f.feed(0, "abc") == ([(0, "abc")], False)


def test_stop_spanning_several_tokens_is_excluded():
    texts = ["Hello", " wor", "ld. ", "Bye", " now"]
    stop = "world. Bye"
    f = StopSequenceFilter((stop,))
    out0, hit0 = f.feed(0, "Hello")
    assert out0 == [(0, "Hello")] and not hit0
    out1, hit1 = f.feed(1, " wor")  # " wor" ends with "wor", a prefix of the stop: held
    assert out1 == [] and not hit1
    out2, hit2 = f.feed(2, "ld. ")
    assert out2 == [] and not hit2
    out3, hit3 = f.feed(3, "Bye")
    assert hit3
    # The token holding the stop's start keeps the text before it; tokens inside the stop
    # are released empty, each index exactly once, in order.
    assert out3 == [(1, " "), (2, ""), (3, "")]
    full = "".join(texts)
    released = "".join(t for _, t in out0 + out1 + out2 + out3)
    assert released == full[: full.find(stop)] == "Hello "


def test_stop_inside_one_token_keeps_text_before_it():
    released, hit_at = _run_filter(("</s>",), ["ab", "c</s>def", "never"])
    assert hit_at == 1
    assert released == [(0, "ab"), (1, "c")]


def test_held_back_text_is_released_by_flush():
    f = StopSequenceFilter(("STOP",))
    assert f.feed(0, "go ") == ([(0, "go ")], False)
    assert f.feed(1, "ST") == ([], False)  # could be the start of STOP
    assert f.feed(2, "O") == ([], False)
    assert f.flush() == [(1, "ST"), (2, "O")]
    assert f.flush() == []


def test_partial_prefix_that_is_not_a_stop_is_released():
    f = StopSequenceFilter(("STOP",))
    assert f.feed(0, "a S") == ([], False)  # ends with "S": held
    assert f.feed(1, "T") == ([], False)    # "ST": still held
    out, hit = f.feed(2, "ay")               # "STay" is not STOP: all released
    assert not hit
    assert out == [(0, "a S"), (1, "T"), (2, "ay")]


def test_partial_hold_releases_whole_tokens_before_the_suffix():
    f = StopSequenceFilter(("STOP",))
    out, hit = f.feed(0, "abc")
    assert out == [(0, "abc")] and not hit
    out, hit = f.feed(1, "xS")  # the held suffix "S" sits inside token 1: token 1 waits
    assert out == [] and not hit
    out, hit = f.feed(2, "TOP!")
    assert hit and out == [(1, "x"), (2, "")]


@pytest.mark.parametrize(
    "stops",
    [("END", "STOP"), ("STOP", "END")],
)
def test_multiple_stops_earliest_wins(stops):
    released, hit_at = _run_filter(stops, ["aa", "STOPbbEND", "zz"])
    assert hit_at == 1
    assert "".join(t for _, t in released) == "aa"


def test_earliest_of_stops_completed_in_different_tokens():
    # "lo" completes in token 1, before "world" can; output ends at the first stop.
    texts = ["hel", "lo wor", "ld"]
    released, hit_at = _run_filter(("world", "lo"), texts)
    assert hit_at == 1
    assert "".join(t for _, t in released) == "hel"
    assert [i for i, _ in released] == [0, 1]


def test_concatenation_equals_text_up_to_stop_for_every_split():
    """Whatever the tokenisation, released text is the full text cut at the first stop."""
    full = "The answer is 42.\n\nQuestion: what else?"
    stops = ("\n\nQuestion:", "zzz")
    expected = full[: full.find("\n\nQuestion:")]
    for size in range(1, 8):
        texts = [full[i : i + size] for i in range(0, len(full), size)]
        released, hit_at = _run_filter(stops, texts)
        assert hit_at is not None
        assert "".join(t for _, t in released) == expected, size
        assert [i for i, _ in released] == list(range(hit_at + 1)), size


def test_no_stop_hit_releases_everything_in_order():
    texts = ["S", "T", "O", "x", "ST"]
    released, hit_at = _run_filter(("STOP",), texts)
    assert hit_at is None
    assert released == list(enumerate(texts))
