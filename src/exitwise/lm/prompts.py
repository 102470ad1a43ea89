"""Many varied chat prompts from local text, for exit tuning on a model's own answers.

A frozen-backbone exit learns to predict what the full model will say; the more varied the
answers it sees, the better it drafts on prompts it has never seen. A few dozen hand-written
prompts are far too few, so :func:`corpus_chat_prompts` builds hundreds to thousands of user
turns by pairing request templates with topics and sentences from public text files:

- WikiText-2 article titles and section headings (``= Title =`` / ``= = Heading = =`` lines);
- SST-2 sentences (``label<TAB>sentence`` TSV);
- Tiny Shakespeare lines;
- a built-in list of everyday topics (used alone when no file is found);
- built-in everyday and programming tasks paired with how-to requests.

Most prompts are assistant-style requests (explain, list, compare, advise, write, how-to) over
those topics and tasks, because that is what a chat model is asked and what its drafts must
predict. Answers to rewording and reading-comprehension requests are more formulaic: an exit
tuned on a mix dominated by them agreed well with the full model on that mix and drafted worse
on chat answers (measured in ``benchmarks/lm_speed.py``; docs/benchmarks/lm_speed.md).

By default the files are looked for in :func:`exitwise.paths.data_root` (``$EXITWISE_DATA``,
else ``../shared/data``); ``data_dir`` points elsewhere. Prompts equal to any of ``exclude``
(e.g. benchmark and calibration prompts) are dropped, so tuning never sees an evaluation
prompt. The result is a pure function of (files, n, seed). :func:`nested_chat_prompts` draws
so that asking for more only appends (what tuning uses, so larger runs reuse cached answers).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import DataError
from ..paths import data_root

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
# Assistant-style requests over one topic ({}) or two ({a}, {b}).
REQUEST_TEMPLATES: tuple[str, ...] = (
    "How does {} work?",
    "Why is {} important?",
    "What are the main advantages and disadvantages of {}?",
    "Describe {} in a few sentences.",
    "List five interesting things about {}.",
    "Summarize the history of {} briefly.",
    "Explain {} in simple words, with an example.",
    "Write a short story that involves {}.",
    "What would a beginner need to know about {}?",
    "Give me a fun fact about {} and explain it.",
    "Write a short blog introduction about {}.",
    "What are some careers related to {}?",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "What is the difference between {a} and {b}?",
    "Compare {a} and {b} in a short table or list.",
    "Write a short dialogue between two friends about {a} and {b}.",
)
TASK_TEMPLATES: tuple[str, ...] = (
    "How do I {}?",
    "Give me step-by-step instructions to {}.",
    "What are common mistakes when people try to {}?",
    "What do I need before I {}?",
)
CODE_TEMPLATES: tuple[str, ...] = (
    "How do I {}?",
    "Show me how to {}, with a short example.",
    "What is the simplest way to {}?",
)
# Everyday tasks (phrased to follow "How do I ...?"), disjoint from the benchmark prompts.
EVERYDAY_TASKS: tuple[str, ...] = (
    "boil an egg", "write a cover letter", "plant tomatoes", "change a flat tire",
    "learn to swim as an adult", "make pancakes", "start running", "budget my monthly salary",
    "clean a cast iron pan", "prepare for a job interview", "train a puppy to sit",
    "fall asleep faster", "write a birthday card", "remove a coffee stain",
    "learn a new language quickly", "plan a road trip", "meditate", "make a paper airplane",
    "care for a houseplant", "negotiate a salary", "bake chocolate chip cookies",
    "set up a home aquarium", "take better photos with my phone", "stop procrastinating",
    "organize my closet", "cook rice on the stove", "write a good essay introduction",
    "back up my computer", "make friends in a new city", "tie a tie", "start a vegetable garden",
    "give constructive feedback", "prepare a presentation", "reduce stress at work",
    "brew coffee with a French press", "choose a laptop", "paint a room",
    "save for retirement", "keep my kitchen clean", "write a short speech for a wedding",
)
# Programming tasks, "How do I {} in Python?" and similar.
CODE_TASKS: tuple[str, ...] = (
    "read a text file line by line in Python", "sort a dictionary by value in Python",
    "remove duplicates from a list in Python", "count words in a string in Python",
    "write a function that checks for palindromes in Python", "merge two lists in Python",
    "parse JSON in JavaScript", "find the largest number in an array in JavaScript",
    "create a class in Python", "handle exceptions in Python", "write a SQL query that counts rows",
    "make an HTTP request in Python", "loop over a dictionary in Python",
    "convert a string to an integer in Python", "write a recursive factorial function",
    "use list comprehensions in Python", "join strings in Python", "sort an array in JavaScript",
    "write a while loop in C", "declare a variable in JavaScript", "format a date in Python",
    "check if a number is prime in Python", "reverse a string in JavaScript",
    "compute the average of a list in Python", "write unit tests in Python",
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
    """The folder holding ``lm/`` and ``sst2/`` text: ``data_dir``, else
    :func:`exitwise.paths.data_root` (``$EXITWISE_DATA`` or ``../shared/data``); None if not
    found."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"text data folder {path} does not exist")
        return path
    root = data_root()
    if root is not None and ((root / "lm").is_dir() or (root / "sst2").is_dir()):
        return root
    return None


def _wikitext_topics(folder: Path) -> tuple[list[str], list[str]]:
    """(titles and section headings, titles only) of the WikiText files, each unique in
    first-seen order; titles are `` = Title = `` lines, headings `` = = Heading = = ``."""
    topics: list[str] = []
    titles: list[str] = []
    for name in ("wikitext2-valid.txt", "wikitext2-test.txt"):
        path = folder / "lm" / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.fullmatch(r" = (= )?([^=]+?) (?:= )?= ", line)
            if m and not _UNK.search(m.group(2)) and len(m.group(2)) > 3:
                topics.append(m.group(2).strip())
                if m.group(1) is None:
                    titles.append(topics[-1])
    return list(dict.fromkeys(topics)), list(dict.fromkeys(titles))


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

    About 45% pair topics (WikiText titles / headings, everyday topics) with assistant-style
    requests (one topic or two), 15% are how-to requests for everyday and programming tasks,
    15% other topic requests, 15% wrap SST-2 sentences, 10% Shakespeare lines; whatever a
    missing file cannot supply is filled from the other sources. Raises ``DataError`` if fewer
    than ``n`` can be made.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"n must be a positive int; got {n!r}")
    rng = random.Random(seed)
    folder = find_text_data(data_dir)
    wiki_topics, wiki_titles = _wikitext_topics(folder) if folder else ([], [])
    topics = list(EVERYDAY_TOPICS) + wiki_topics
    sentences = _sst2_sentences(folder) if folder else []
    verses = _shakespeare_lines(folder) if folder else []
    # Section headings ("Early life", "Reception") make vague topics: requests use article
    # titles and the everyday topics only.
    titled = list(EVERYDAY_TOPICS) + wiki_titles
    # A fixed stride pairs each topic with an unrelated one (about two pairs per topic).
    pairs = [(titled[i], titled[(i * 7 + 3) % len(titled)]) for i in range(len(titled))]
    pools: list[list[str]] = [
        [t.format(x) for x in titled for t in REQUEST_TEMPLATES]
        + [t.format(a=a, b=b) for a, b in pairs if a != b for t in PAIR_TEMPLATES],
        [t.format(x) for x in EVERYDAY_TASKS for t in TASK_TEMPLATES]
        + [t.format(x) for x in CODE_TASKS for t in CODE_TEMPLATES],
        [t.format(x) for x in topics for t in TOPIC_TEMPLATES],
        [rng.choice(SENTENCE_TEMPLATES).format(s) for s in sentences],
        [rng.choice(VERSE_TEMPLATES).format(v) for v in verses],
    ]
    for pool in pools:
        rng.shuffle(pool)
    banned = set(exclude)
    shares = (0.45, 0.15, 0.15, 0.15, 0.1)
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


def nested_chat_prompts(
    n: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
    exclude: Iterable[str] = (),
    pool: int = 2400,
) -> list[str]:
    """``n`` distinct user turns such that asking for more only ever appends: the first ``m``
    of a draw of ``n`` are the draw of ``m`` for every ``m < n``, so a larger tuning run reuses
    a smaller one's cached answers and its held-out prompts can be told apart.

    The first ``pool`` prompts are :func:`corpus_chat_prompts` of ``pool`` (as tuning always
    drew them, so earlier caches still match). Past it, draws of ``2 * pool``, ``4 * pool``, ...
    each append, in their own shuffled order, the prompts not taken before. (A larger draw takes
    a longer prefix of every shuffled source, so it holds the smaller draw's prompts; the
    de-duplication is what keeps the order nested.) Raises ``DataError`` if the files cannot
    supply ``n``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"n must be a positive int; got {n!r}")
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise DataError(f"pool must be a positive int; got {pool!r}")
    exclude = tuple(exclude)
    size = pool
    picked = corpus_chat_prompts(size, seed, data_dir, exclude, minimum=min(n, size))
    seen = set(picked)
    while len(picked) < n:
        size *= 2
        more = [p for p in corpus_chat_prompts(size, seed, data_dir, exclude, minimum=1)
                if p not in seen]
        if not more:
            raise DataError(
                f"only {len(picked)} distinct prompts could be built (asked for {n}); point "
                "data_dir at a folder with lm/wikitext2-*.txt, sst2/train.tsv, "
                "lm/tinyshakespeare.txt")
        seen.update(more)
        picked += more
    return picked[:n]


# Fixed, varied user turns (chat-formatted before use).
BENCH_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in simple terms.",
    "Write a short poem about the sea.",
    "What are three tips for staying productive when working from home?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I reverse a list in Python?",
    "What is the difference between a virus and a bacterium?",
    "Give me a recipe for a simple tomato soup.",
    "Why do leaves change color in autumn?",
    "Write a polite email asking a colleague for a meeting next week.",
    "What is photosynthesis?",
    "List five countries in South America and their capitals.",
    "How does a bicycle stay upright?",
    "Explain what a neural network is to a ten-year-old.",
    "What should I pack for a weekend camping trip?",
    "Describe the water cycle.",
    "What are the benefits of regular exercise?",
    "Write a short story opening about a lost key.",
    "How do vaccines work?",
    "What is the Pythagorean theorem? Give an example.",
    "Suggest three names for a coffee shop and explain each.",
    "What causes earthquakes?",
    "How can I improve my sleep?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is the capital of Australia, and why is it not Sydney?",
)

# Disjoint from BENCH_PROMPTS: used only to certify early-exit thresholds (Learn-then-Test
# needs a few dozen sequences before any threshold can be certified).
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "What is the boiling point of water at sea level?",
    "Write a haiku about mountains.",
    "How do I make a cup of green tea?",
    "Explain what gravity is.",
    "Name three famous painters and one work by each.",
    "What is a prime number?",
    "Give two reasons to learn a second language.",
    "How does a refrigerator keep food cold?",
    "Write a thank-you note to a teacher.",
    "What is the largest planet in the solar system?",
    "How do bees make honey?",
    "Describe a sunset in two sentences.",
    "What is the difference between weather and climate?",
    "How do I center a div in CSS?",
    "What does a cell's nucleus do?",
    "Suggest a name for a pet turtle.",
    "Why is the ocean salty?",
    "What is inflation in economics?",
    "Write a limerick about a cat.",
    "How many continents are there? Name them.",
    "What is the speed of light?",
    "Give me three ideas for a birthday party.",
    "How do airplanes fly?",
    "What is democracy?",
    "Explain recursion with a simple example.",
    "What are the primary colors?",
    "How can I save money on groceries?",
    "What is the tallest mountain on Earth?",
    "Write a two-line slogan for a bakery.",
    "Why do we have seasons?",
    "What is the function of the heart?",
    "How do I write a for loop in JavaScript?",
    "What are renewable energy sources?",
    "Describe a cat to someone who has never seen one.",
    "What is the meaning of the word 'ephemeral'?",
    "How does the moon affect tides?",
    "Give a short tip for public speaking.",
    "What is an atom made of?",
    "Why should I drink enough water?",
    "What is a haiku?",
)
