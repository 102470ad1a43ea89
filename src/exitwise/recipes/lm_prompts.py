"""Many varied chat prompts from local text, for exit tuning on a model's own answers.

A frozen-backbone exit learns to predict what the full model will say; the more varied the
answers it sees, the better it drafts on prompts it has never seen. Sixty hand-written
prompts are far too few (the exit then agrees with the final layer on ~19% of new answers),
so :func:`corpus_chat_prompts` builds hundreds to thousands of user turns by pairing request
templates with topics and sentences from public text files:

- WikiText-2 article titles and section headings (``= Title =`` / ``= = Heading = =`` lines);
- SST-2 sentences (``label<TAB>sentence`` TSV);
- Tiny Shakespeare lines;
- a built-in list of everyday topics (used alone when no file is found).

By default the files are looked for in ``../shared/data`` (this project's data folder);
``data_dir`` points elsewhere. Prompts equal to any of ``exclude`` (e.g. benchmark and
calibration prompts) are dropped, so tuning never sees an evaluation prompt. The result is a
pure function of (files, n, seed).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError

TOPIC_TEMPLATES: tuple[str, ...] = (
    "Tell me about {}.",
    "What is {} known for?",
    "Explain {} to a ten-year-old.",
    "Write a short paragraph about {}.",
    "Give me three facts about {}.",
    "What are common misconceptions about {}?",
    "Write a four-line poem about {}.",
    "What questions would you ask an expert on {}?",
)
SENTENCE_TEMPLATES: tuple[str, ...] = (
    'Is this movie review positive or negative? "{}"',
    'Rewrite this sentence in plain, formal English: "{}"',
    'Continue this movie review with two more sentences: "{}"',
    'Summarize the opinion in this sentence: "{}"',
)
VERSE_TEMPLATES: tuple[str, ...] = (
    'Explain this line from Shakespeare in modern English: "{}"',
    'Who might say this, and why? "{}"',
)
# Everyday topics, disjoint in wording from the benchmark prompts in lm_bench.py.
EVERYDAY_TOPICS: tuple[str, ...] = (
    "volcanoes", "the printing press", "coffee", "chess openings", "the Roman Empire",
    "electric guitars", "recycling plastic", "the human brain", "earthquakes", "bicycles",
    "the stock market", "jazz music", "penguins", "the internet", "vaccines", "rainforests",
    "the Great Wall of China", "origami", "submarines", "the periodic table", "sushi",
    "time zones", "glaciers", "the violin", "solar eclipses", "public libraries", "honeybees",
    "the Renaissance", "marathon running", "quantum computers", "wind turbines", "dinosaurs",
    "the Amazon river", "yoga", "comets", "typewriters", "the metric system", "coral reefs",
    "board games", "robots", "bread baking", "the Eiffel Tower", "lighthouses", "owls",
    "spreadsheets", "the Moon landing", "tea ceremonies", "deserts", "ancient Egypt",
    "video games", "sharks", "gardening", "the piano", "passwords", "trains", "mushrooms",
)
_UNK = re.compile(r"<unk>|@")


def find_text_data(data_dir: str | Path | None = None) -> Path | None:
    """The folder holding ``lm/`` and ``sst2/`` text: ``data_dir``, else ``../shared/data``
    relative to the working directory or to this checkout; None if not found."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"text data folder {path} does not exist")
        return path
    here = Path(__file__).resolve()
    for c in [Path.cwd() / "../shared/data", *(p / "shared/data" for p in here.parents)]:
        if (c / "lm").is_dir() or (c / "sst2").is_dir():
            return c.resolve()
    return None


def _wikitext_topics(folder: Path) -> list[str]:
    topics: list[str] = []
    for name in ("wikitext2-valid.txt", "wikitext2-test.txt"):
        path = folder / "lm" / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.fullmatch(r" = (?:= )?([^=]+?) (?:= )?= ", line)
            if m and not _UNK.search(m.group(1)) and len(m.group(1)) > 3:
                topics.append(m.group(1).strip())
    return list(dict.fromkeys(topics))  # unique, first-seen order


def _sst2_sentences(folder: Path) -> list[str]:
    path = folder / "sst2" / "train.tsv"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t")
        sentence = parts[-1].strip()
        if 40 <= len(sentence) <= 160:
            out.append(sentence)
    return out


def _shakespeare_lines(folder: Path) -> list[str]:
    path = folder / "lm" / "tinyshakespeare.txt"
    if not path.is_file():
        return []
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if 30 <= len(s) <= 90 and not s.endswith(":")]


def corpus_chat_prompts(
    n: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
    exclude: Iterable[str] = (),
    minimum: int | None = None,
) -> list[str]:
    """``n`` distinct user turns (see module doc), shuffled with ``seed``.

    minimum: accept fewer than ``n`` (all that can be made) as long as there are this many.

    About 40% pair topics (WikiText titles / headings, everyday topics) with request templates,
    40% wrap SST-2 sentences, 20% Shakespeare lines; whatever a missing file cannot supply is
    filled from the other sources. Raises ``DataError`` if fewer than ``n`` can be made.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"n must be a positive int; got {n!r}")
    rng = random.Random(seed)
    folder = find_text_data(data_dir)
    topics = list(EVERYDAY_TOPICS) + (_wikitext_topics(folder) if folder else [])
    sentences = _sst2_sentences(folder) if folder else []
    verses = _shakespeare_lines(folder) if folder else []
    pools: list[list[str]] = [
        [t.format(x) for x in topics for t in TOPIC_TEMPLATES],
        [rng.choice(SENTENCE_TEMPLATES).format(s) for s in sentences],
        [rng.choice(VERSE_TEMPLATES).format(v) for v in verses],
    ]
    for pool in pools:
        rng.shuffle(pool)
    banned = set(exclude)
    shares = (0.4, 0.4, 0.2)
    picked: list[str] = []
    seen: set[str] = set()

    def take(pool: Sequence[str], count: int) -> None:
        for p in pool:
            if len(picked) >= n or count <= 0:
                return
            if p not in seen and p not in banned:
                seen.add(p)
                picked.append(p)
                count -= 1

    for pool, share in zip(pools, shares):
        take(pool, round(share * n))
    for pool in pools:  # top up from whatever has prompts left
        take(pool, n - len(picked))
    if len(picked) < (n if minimum is None else minimum):
        raise DataError(
            f"only {len(picked)} distinct prompts could be built (asked for "
            f"{n if minimum is None else minimum}); point "
            "data_dir at a folder with lm/wikitext2-*.txt, sst2/train.tsv, lm/tinyshakespeare.txt"
        )
    rng.shuffle(picked)
    return picked
