"""Stop strings, EOS and the streaming callback of ``generate``; bad sampling options.

A toy tokenizer decodes token i to one or two letters of a 5-letter alphabet, so stop strings
often span token boundaries. The expected cut is found by decoding whole prefixes (not the
implementation's tail window): the first n whose text holds a stop string (it ends inside
token n, which may run past it, as in HF's ``StopStringCriteria``).
"""

from __future__ import annotations

import pytest
from helpers.lmkit import PAD, left_padded, tiny_lm

from exitwise.errors import ConfigError
from exitwise.generation import StopStrings, generate

NEW = 16
STRATEGIES = [("greedy", {}), ("self_speculative", dict(exit_layer=2, draft_len=4))]


class ToyTokenizer:
    def piece(self, i: int) -> str:
        return "abcde"[i % 5] * (1 + (i // 5) % 2)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.piece(int(i)) for i in ids)


TOK = ToyTokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def generated(out, ids) -> list[list[int]]:
    t = ids.shape[1]
    return [out.sequences[r, t : t + n].tolist() for r, n in enumerate(out.stats.new_tokens)]


def expected_cut(tokens: list[int], stops: list[str]) -> int:
    for n in range(1, len(tokens) + 1):
        if any(s in TOK.decode(tokens[:n]) for s in stops):
            return n
    return len(tokens)


@pytest.mark.parametrize("strategy, opts", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_stop_strings_truncate_each_row_after_the_completing_token(llama, strategy, opts):
    ids, mask = left_padded()
    base = dict(max_new_tokens=NEW, eos_token_id=[], pad_token_id=PAD)
    full = generated(generate(llama, ids, mask, **base), ids)
    # stop strings made from row 0's text (3 characters ending at its 5th token) and row 2's
    stops = [TOK.decode(full[0][:5])[-3:], TOK.decode(full[2][:9])[-2:]]
    cuts = [expected_cut(g, stops) for g in full]
    assert cuts[0] <= 5 and cuts[2] <= 9 and min(cuts) < NEW
    out = generate(
        llama, ids, mask, strategy=strategy, stop_strings=stops, tokenizer=TOK, **base, **opts
    )
    assert out.stats.new_tokens == cuts
    assert generated(out, ids) == [g[:n] for g, n in zip(full, cuts)]
    t = ids.shape[1]
    for r, n in enumerate(cuts):  # the rest of a stopped row is padding
        assert (out.sequences[r, t + n :] == PAD).all()
    # a stop string that never occurs changes nothing
    never = generate(
        llama, ids, mask, strategy=strategy, stop_strings="zzz", tokenizer=TOK, **base, **opts
    )
    assert generated(never, ids) == full


def test_stop_string_tail_window_sees_multi_token_strings():
    stop = StopStrings(["ab", "ccd"], TOK)
    assert stop.hit([0, 1])  # "a" + "b"
    assert stop.hit([4, 4, 2, 2, 3])  # "...cc" + "d"
    assert not stop.hit([2, 3, 0])  # "cda"
    long = [4] * 50 + [0, 1]
    assert stop.hit(long)
    # the newest token may run past the stop string ("a" + "bb"; "cc" + "dd")
    assert stop.hit([0, 6]) and stop.hit([7, 8])
    # a stop string that ended in an earlier token is not the newest token's
    assert not stop.hit([0, 1, 2]) and not stop.hit([0, 6, 2])


class ByteTokenizer:
    """Byte-level: token i is byte i (what byte-level BPE falls back to)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def test_stop_strings_of_many_bytes_per_character_are_seen():
    s = "\N{THINKING FACE}" * 6  # 6 characters, 24 bytes: 24 tokens of a byte tokenizer
    stop = StopStrings([s], ByteTokenizer())
    ids = list(b"so " + s.encode("utf-8"))
    assert [n for n in range(1, len(ids) + 1) if stop.hit(ids[:n])] == [len(ids)]


def test_a_character_completed_over_several_tokens_is_the_newest_tokens_text():
    # "a" then the 4 bytes of an emoji: while the emoji is partial the tail's text is not
    # prefix-stable ("a" + U+FFFD ...), and the "a" of the first token is still not the
    # newest token's
    stop = StopStrings(["a"], ByteTokenizer())
    ids = list("a\N{THINKING FACE}".encode("utf-8"))
    assert [n for n in range(1, len(ids) + 1) if stop.hit(ids[:n])] == [1]
    emoji = StopStrings(["\N{THINKING FACE}"], ByteTokenizer())
    assert [n for n in range(1, len(ids) + 1) if emoji.hit(ids[:n])] == [len(ids)]


@pytest.mark.parametrize("strategy, opts", STRATEGIES, ids=[s for s, _ in STRATEGIES])
@pytest.mark.parametrize("do_sample", [False, True])
def test_callback_streams_exactly_the_committed_tokens(llama, strategy, opts, do_sample):
    ids, mask = left_padded()
    calls: list[tuple[int, list[int]]] = []
    out = generate(
        llama, ids, mask, strategy=strategy, max_new_tokens=NEW, eos_token_id=[],
        do_sample=do_sample, seed=3, callback=lambda r, new: calls.append((r, list(new))),
        **opts,
    )
    streamed: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for r, new in calls:
        assert new  # never called with nothing
        streamed[r] += new
    assert streamed == generated(out, ids)  # rejected drafts are never streamed
    if strategy == "self_speculative":  # accepted drafts arrive several at once
        assert max(len(new) for _, new in calls) > 1
        assert len(calls) < sum(out.stats.new_tokens)
    else:
        assert all(len(new) == 1 for _, new in calls)


@pytest.mark.parametrize("strategy, opts", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_eos_ends_a_row_and_its_stream(llama, strategy, opts):
    ids, mask = left_padded()
    full = generated(generate(llama, ids, mask, max_new_tokens=NEW, eos_token_id=[]), ids)
    eos = full[0][3]  # a token row 0 emits as its 4th: make it the EOS
    calls: dict[int, list[int]] = {}
    out = generate(
        llama, ids, mask, strategy=strategy, max_new_tokens=NEW, eos_token_id=eos,
        pad_token_id=PAD, callback=lambda r, new: calls.setdefault(r, []).extend(new), **opts,
    )
    cut0 = full[0].index(eos) + 1
    assert out.stats.new_tokens[0] == cut0 <= 4
    assert calls[0] == full[0][:cut0] and calls[0][-1] == eos
    for r, g in enumerate(full):
        n = g.index(eos) + 1 if eos in g else NEW
        assert calls[r] == g[:n]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=float("nan")), "temperature"),
        (dict(do_sample=True, temperature=float("inf")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_p=-0.2), "top_p"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(do_sample=True, top_k=2.5), "top_k"),
        (dict(do_sample=True, seed="x"), "seed"),
        (dict(do_sample=True, generator=42), "generator"),
        (dict(stop_strings=["ab"]), "tokenizer"),
        (dict(stop_strings=["ab"], tokenizer=object()), "tokenizer"),
        (dict(stop_strings=[""], tokenizer=TOK), "stop_strings"),
        (dict(stop_strings=[], tokenizer=TOK), "stop_strings"),
        (dict(stop_strings=[3], tokenizer=TOK), "stop_strings"),
        (dict(callback=5), "callback"),
    ],
)
def test_bad_sampling_and_stopping_options(llama, kwargs, match):
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match=match):
        generate(llama, ids, mask, max_new_tokens=2, **kwargs)

