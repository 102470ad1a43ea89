"""A prompts file for ``exitwise tune-lm --prompts-file``: the tuning run's own corpus prompts
followed by real users' questions from WikiQA, to test whether the prompts' kind (not only
their number) limits a draft exit on the benchmark prompts.

    python benchmarks/wikiqa_prompts.py --corpus 2400 --questions 1200 \
        --out benchmarks/work/lm_speed/prompts_a2400_wikiqa1200.json

The first ``--corpus`` prompts are exactly those ``tune-lm --answers N`` draws
(``nested_chat_prompts``, benchmark and calibration prompts excluded), so a run on this file
reuses that run's cached answers. Then ``--questions`` distinct WikiQA questions (train, dev
and test files of ``<data>/wikiqa``, the question column; tokenisation spaces before ``?``,
``,`` and ``'s`` removed, first letter capitalised, all-capitals questions dropped), shuffled
with ``--seed``. No benchmark prompt is a WikiQA question.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.lm.prompts import (  # noqa: E402
    BENCH_PROMPTS,
    CALIBRATION_PROMPTS,
    nested_chat_prompts,
)
from exitwise.paths import data_root  # noqa: E402


def wikiqa_questions(folder: Path) -> list[str]:
    """Distinct, readable questions of the WikiQA files in ``folder``, in file order."""
    out: list[str] = []
    seen: set[str] = set()
    for split in ("train", "dev", "test"):
        for line in (folder / f"{split}.txt").read_text().splitlines():
            q = line.split("\t")[0].strip()
            if not q or q.isupper():
                continue
            q = q[0].upper() + q[1:]
            q = q.replace(" ?", "?").replace(" ,", ",").replace(" 's", "'s")
            q = q if q.endswith("?") else q + "?"
            if q not in seen:
                seen.add(q)
                out.append(q)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=int, default=2400)
    ap.add_argument("--questions", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="folder holding wikiqa/ (default: data root)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    excluded = (*BENCH_PROMPTS, *CALIBRATION_PROMPTS)
    base = nested_chat_prompts(args.corpus, exclude=excluded)
    folder = Path(args.data) if args.data else data_root()
    if folder is None or not (folder / "wikiqa").is_dir():
        raise SystemExit("no wikiqa folder: give --data (a folder holding wikiqa/train.txt ...)")
    taken = set(base) | set(excluded)
    questions = [q for q in wikiqa_questions(folder / "wikiqa") if q not in taken]
    random.Random(args.seed).shuffle(questions)
    if len(questions) < args.questions:
        raise SystemExit(f"only {len(questions)} WikiQA questions; asked for {args.questions}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(base + questions[: args.questions]))
    print(f"wrote {args.out}: {args.corpus} corpus prompts + {args.questions} WikiQA questions")


if __name__ == "__main__":
    main()
