from __future__ import annotations

import random

import pytest

from engine.stop_strings import StopStringMatcher


def _run(
    chunks: list[str], stops: list[str], include: bool = False
) -> tuple[list[str], str | None]:
    """Feeds ``chunks``; returns what was emitted per feed (+ flush) and the match."""
    matcher = StopStringMatcher(stops, include)
    emitted = []
    for chunk in chunks:
        text, stop = matcher.feed(chunk)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    emitted.append(matcher.flush())
    return emitted, None


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Cut at the stop that ends first (ties: starts first), on the whole text."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, start, stop = min(found, key=lambda item: item[:2])
    return text[: end if include else start], stop


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_stop_inside_one_delta() -> None:
    assert _run(["Hello STOP world"], ["STOP"]) == (["Hello "], "STOP")


def test_stop_across_deltas_is_cut_exactly() -> None:
    emitted, stop = _run(["Hello S", "T", "OP", " world"], ["STOP"])
    assert stop == "STOP"
    assert emitted == ["Hello ", "", ""]


def test_include_stop_str_in_output() -> None:
    emitted, stop = _run(["Hello S", "TO", "P world"], ["STOP"], include=True)
    assert stop == "STOP"
    assert "".join(emitted) == "Hello STOP"
    assert emitted[0] == "Hello S"  # nothing is held back when the stop is kept


def test_earliest_stop_wins_regardless_of_order() -> None:
    for stops in (["END", "STOP"], ["STOP", "END"]):
        emitted, stop = _run(["a STOP b END c"], stops)
        assert (emitted, stop) == (["a "], "STOP")


def test_stop_ending_first_wins_over_longer_overlapping_one() -> None:
    # "bc" completes before "abcd" does, whatever the chunking.
    for chunks in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        emitted, stop = _run(chunks, ["abcd", "bc"])
        assert ("".join(emitted), stop) == ("a", "bc")


def test_prefix_of_another_stop() -> None:
    assert _run(["foo", "baz"], ["foobar", "foo"]) == ([""], "foo")
    emitted, stop = _run(["xfoob", "ar"], ["foobar", "oob!"])
    assert ("".join(emitted), stop) == ("x", "foobar")


def test_held_back_text_restarts_partial_match() -> None:
    emitted, stop = _run(list("abcabcX!"), ["abcX"])
    assert ("".join(emitted), stop) == ("abc", "abcX")


def test_held_back_text_released_on_flush() -> None:
    matcher = StopStringMatcher(["STOP"], False)
    assert matcher.feed("hello ST") == ("hello ", None)
    assert matcher.feed("O") == ("", None)
    assert matcher.flush() == "STO"
    with pytest.raises(RuntimeError):
        matcher.feed("P")


def test_held_back_text_released_when_ruled_out() -> None:
    matcher = StopStringMatcher(["STOP"], False)
    assert matcher.feed("a ST") == ("a ", None)
    assert matcher.feed("ART") == ("START", None)


def test_no_stops_passes_through() -> None:
    matcher = StopStringMatcher([], False)
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""], False)


@pytest.mark.parametrize("include", [False, True])
def test_random_streams_match_reference(include: bool) -> None:
    rng = random.Random(7 + include)
    alphabet = "ab c你😀"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))]
        stops += rng.sample([*stops, "ab", "ba", "aab", "c你", "😀a"], k=rng.randint(0, 3))
        emitted, stop = _run(_random_chunks(text, rng), stops, include)
        assert ("".join(emitted), stop) == _reference(text, stops, include)
