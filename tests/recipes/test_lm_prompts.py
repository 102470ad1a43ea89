"""Chat prompts built from local text for exit tuning (exitwise.recipes.lm_prompts)."""

from __future__ import annotations

import pytest

from exitwise.errors import DataError
from exitwise.recipes.lm_prompts import EVERYDAY_TOPICS, TOPIC_TEMPLATES, corpus_chat_prompts


# every prompt the fixture below allows: topics (everyday + 2 WikiText) x templates, 30 SST-2
# sentences, 2 Shakespeare lines
TOTAL = (len(EVERYDAY_TOPICS) + 2) * len(TOPIC_TEMPLATES) + 30 + 2


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
    assert sum("movie review" in p or "sentence" in p for p in a) >= 20  # ~40% SST-2
    a = corpus_chat_prompts(TOTAL, data_dir=data_dir)
    assert any("Homarus gammarus" in p for p in a)           # WikiText title
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
