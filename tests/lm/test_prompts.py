"""Chat prompts built from local text for exit tuning (exitwise.lm.prompts)."""

from __future__ import annotations

import pytest

from exitwise.errors import DataError
from exitwise.lm.prompts import (
    CODE_TASKS,
    CODE_TEMPLATES,
    EVERYDAY_TASKS,
    EVERYDAY_TOPICS,
    PAIR_TEMPLATES,
    REQUEST_TEMPLATES,
    TASK_TEMPLATES,
    TOPIC_TEMPLATES,
    corpus_chat_prompts,
    nested_chat_prompts,
)

# every prompt the fixture below allows: requests over the titled topics (everyday + the one
# readable WikiText title) and over pairs of them (topic i with topic 7i + 3, never itself),
# how-to requests for the built-in tasks, topic requests (everyday + title + heading), 30 SST-2
# sentences, 2 Shakespeare lines
_TITLED = len(EVERYDAY_TOPICS) + 1
_PAIRS = sum(i != (i * 7 + 3) % _TITLED for i in range(_TITLED))
TOTAL = (
    _TITLED * len(REQUEST_TEMPLATES) + _PAIRS * len(PAIR_TEMPLATES)
    + len(EVERYDAY_TASKS) * len(TASK_TEMPLATES) + len(CODE_TASKS) * len(CODE_TEMPLATES)
    + (len(EVERYDAY_TOPICS) + 2) * len(TOPIC_TEMPLATES) + 30 + 2
)


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "sst2").mkdir()
    (tmp_path / "lm" / "wikitext2-valid.txt").write_text(
        " = Homarus gammarus = \n text about lobsters \n = = Description = = \n"
        " = Frank <unk> = \n = M @-@ 82 = \n"
    )
    (tmp_path / "sst2" / "train.tsv").write_text(
        "label\tsentence\n" + "".join(f"1\ta perfectly charming little film number {i} ok\n"
                                      for i in range(30))
    )
    (tmp_path / "lm" / "tinyshakespeare.txt").write_text(
        "First Citizen:\nBefore we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\n"
    )
    return tmp_path


def test_prompts_are_distinct_deterministic_and_mix_the_sources(data_dir):
    a = corpus_chat_prompts(60, seed=3, data_dir=data_dir)
    assert a == corpus_chat_prompts(60, seed=3, data_dir=data_dir)
    assert a != corpus_chat_prompts(60, seed=4, data_dir=data_dir)
    assert len(a) == len(set(a)) == 60
    assert sum("charming little film" in p for p in a) >= 5  # ~15% SST-2
    assert sum(p.startswith(("How do I", "Give me step-by-step", "Show me how")) for p in a) >= 4
    a = corpus_chat_prompts(TOTAL, data_dir=data_dir)
    assert len(a) == len(set(a)) == TOTAL
    assert any("Homarus gammarus" in p for p in a)           # WikiText title
    assert any("Description" in p for p in a)                # WikiText heading (topic requests)
    # headings are too vague for the assistant-style requests; titles are used there
    assert not any(p == "How does Description work?" for p in a)
    assert "How does Homarus gammarus work?" in a
    assert any(p.startswith("What is the difference between") for p in a)
    assert any("charming little film" in p for p in a)       # SST-2 sentence
    assert any("hear me speak" in p for p in a)              # Shakespeare line
    assert not any("<unk>" in p or "@" in p for p in a)      # unreadable titles dropped
    assert not any("First Citizen:" in p for p in a)         # speaker tags are not lines


def test_excluded_prompts_never_appear(data_dir):
    banned = TOPIC_TEMPLATES[0].format(EVERYDAY_TOPICS[0])
    total = TOTAL
    assert banned in corpus_chat_prompts(total, data_dir=data_dir)
    rest = corpus_chat_prompts(total - 1, data_dir=data_dir, exclude=[banned])
    assert banned not in rest
    with pytest.raises(DataError, match="only"):
        corpus_chat_prompts(total, data_dir=data_dir, exclude=[banned])


def test_too_many_or_bad_requests_are_refused(data_dir, tmp_path):
    with pytest.raises(DataError, match="only"):
        corpus_chat_prompts(100_000, data_dir=data_dir)
    with pytest.raises(DataError, match="positive"):
        corpus_chat_prompts(0, data_dir=data_dir)
    with pytest.raises(DataError, match="does not exist"):
        corpus_chat_prompts(5, data_dir=tmp_path / "nope")


def test_a_minimum_accepts_all_that_can_be_made(data_dir):
    got = corpus_chat_prompts(TOTAL + 50, data_dir=data_dir, minimum=10)
    assert len(got) == TOTAL


def test_nested_prompts_only_ever_append(data_dir):
    pool = 40
    first = nested_chat_prompts(pool, seed=2, data_dir=data_dir, pool=pool)
    # up to the pool: the pool's draw, as tuning always drew it (earlier caches still match)
    assert first == corpus_chat_prompts(pool, seed=2, data_dir=data_dir)
    assert nested_chat_prompts(25, seed=2, data_dir=data_dir, pool=pool) == first[:25]
    big = nested_chat_prompts(150, seed=2, data_dir=data_dir, pool=pool)
    assert len(big) == len(set(big)) == 150
    # every smaller request is a prefix, past the pool too (a plain draw of 150 is not)
    for m in (41, 79, 80, 81, 149):
        assert nested_chat_prompts(m, seed=2, data_dir=data_dir, pool=pool) == big[:m]
    assert corpus_chat_prompts(150, seed=2, data_dir=data_dir)[:pool] != first
    # the second tier is the draw of 2 * pool minus the first tier, in that draw's order
    tier = [p for p in corpus_chat_prompts(2 * pool, seed=2, data_dir=data_dir)
            if p not in set(first)]
    assert big[pool : 2 * pool] == tier
    banned = big[100]
    assert banned not in nested_chat_prompts(150, seed=2, data_dir=data_dir, pool=pool,
                                             exclude=[banned])


def test_nested_prompts_refuse_more_than_the_files_hold(data_dir):
    assert len(nested_chat_prompts(TOTAL, data_dir=data_dir, pool=100)) == TOTAL
    with pytest.raises(DataError, match=f"only {TOTAL} distinct"):
        nested_chat_prompts(TOTAL + 1, data_dir=data_dir, pool=100)
    with pytest.raises(DataError, match="positive"):
        nested_chat_prompts(5, data_dir=data_dir, pool=0)
