"""Adaptive multi-level n-gram drafts from the text itself (ANPD; Ou et al., NAACL 2024).

ANPD drafts without any model: an n-gram module built from the prompt's tokens and updated
with every token decoding accepts predicts the next tokens; the full model verifies them as it
verifies any draft, so the output stays exactly greedy (or, sampling, the full model's law).
The *multi-level* module (the paper's MLN) keeps one table per order n = N .. 2, each mapping
the last n - 1 tokens to the token that followed them; a query tries the longest context first
and falls back to shorter ones, and a draft of k tokens is read by querying again with each
predicted token appended (the paper's auto-regressive use of the module).

Per row (shapes are Python lists; a batch has one :class:`NGramTables` per row):

- ``update(tokens)`` ingests tokens appended to the row's text; only text decoding has
  accepted is ever ingested, never a draft, so a rejected draft needs no rollback: the tables
  after any number of steps equal tables built from the accepted text (a test checks it).
- ``propose(k)`` returns up to k tokens (empty when even the shortest context is unseen).

Reference: the paper's Section 3 (the N-gram module, its update with accepted tokens and the
multi-level fallback); its code was not found, so this follows the text. Deviations and
choices stated: a context seen several times predicts the token that followed it *most
recently* (the module adapts to the text as it goes); the default order is N = 4 (contexts of
3, 2, 1 tokens) because the paper's own default could not be read here; drafting stops at the
first context seen nowhere instead of padding the draft. An addition of exitwise's, not the
paper's: each proposal reports the length of the match behind it (``NGramDrafter.levels``), so
that ``draft_len="auto"`` (:mod:`.draft_control`) keeps acceptance and chooses a length per
match length.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import ConfigError


class Proposer(Protocol):
    """Drafts known before a speculative step, per row (n-gram lookups, a layer-skipping draft
    model). source: its name in the controller's acceptance counts; passes: what proposing k
    tokens costs in model passes ("none": lookups only; "per_draft": one pass per draft)."""

    source: str
    passes: str

    def start(self, prompts: list[list[int]]) -> None:
        """Before decoding: each row's prompt tokens (index = original row)."""

    def prepare(self, session: Any) -> None:
        """Before each decoding step (speculative, or plain when the controller rests),
        outside the measured drafting time: work that is not drafting (SWIFT's search of the
        skipped set, :mod:`.swift`)."""

    def propose_rows(self, session: Any, caps: list[int]) -> list[list[int]]:
        """Per active row of ``session``, up to ``caps[i]`` draft tokens (may be fewer)."""
        ...

    # Optional: ``observe(accepted, drafted)``, called after each verified step with, per row
    # this proposer drafted for, the drafts kept and proposed (a layer-skipping draft's
    # adaptive confidence threshold, :class:`~.layer_skip.DraftThreshold`); and
    # ``tree_siblings`` / ``tree_widths``, left by ``propose_rows`` when the drafts come with
    # sibling leaves of a token tree (a draft model's next choices, :mod:`.token_tree`).


class NGramTables:
    """Tables of orders ``max_n`` .. 2 over one growing text.

    tables[c - 1] maps a context of c tokens (a tuple) to the token that followed it last.
    """

    def __init__(self, max_n: int = 4, tokens: list[int] | None = None) -> None:
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 2:
            raise ConfigError(f"the n-gram order must be an int >= 2; got {max_n!r}")
        self.max_n = max_n
        self.text: list[int] = []
        self.tables: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - 1)]
        self.match = 0  # context length behind the last proposal's first token
        if tokens:
            self.update(tokens)

    def update(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the text, recording every n-gram that ends in one of them."""
        text = self.text
        for t in tokens:
            text.append(int(t))
            end = len(text) - 1  # index of the new token
            for c, table in enumerate(self.tables, start=1):
                if end >= c:
                    table[tuple(text[end - c:end])] = text[end]

    def next_token(self, context: list[int]) -> int | None:
        """The token predicted after ``context`` by the longest order that has seen its tail."""
        return self.lookup(context)[0]

    def lookup(self, context: list[int]) -> tuple[int | None, int]:
        """(the token predicted after ``context``, the length of the context that predicted
        it: the longest seen tail; (None, 0) when no table has seen any)."""
        for c in range(min(len(self.tables), len(context)), 0, -1):
            hit = self.tables[c - 1].get(tuple(context[-c:]))
            if hit is not None:
                return hit, c
        return None, 0

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens continuing the text, each predicted from the text plus the
        tokens predicted before it; stops at the first context no table has seen. Sets
        ``match``: the context length that predicted the first token (0: none)."""
        context = self.text[-(self.max_n - 1):] if self.max_n > 1 else []
        out: list[int] = []
        self.match = 0
        while len(out) < k:
            nxt, c = self.lookup(context)
            if nxt is None:
                break
            if not out:
                self.match = c
            out.append(nxt)
            context = (context + [nxt])[-(self.max_n - 1):]
        return out


class NGramDrafter:
    """One :class:`NGramTables` per row of a decode session, fed with what the rows emit (a
    :class:`Proposer`).

    The text of a row is its prompt's real tokens followed by every token it emitted (the
    pending token included, since it is the full model's own choice).

    ``levels``: the names under which an automatic draft length keeps acceptance apart, one
    per context length of the match behind a draft ("ngram/3" .. "ngram/1" for max_n = 4): a
    continuation found after three matching tokens is kept far more often than one found
    after a single token, so one pooled rate would draft too little after long matches and
    too much after short ones. ``row_levels``: after :meth:`propose_rows`, each row's level
    (None: no proposal).
    """

    source = "ngram"
    passes = "none"

    def __init__(self, max_n: int = 4) -> None:
        NGramTables(max_n)  # validates max_n
        self.max_n = max_n
        self.rows: dict[int, NGramTables] = {}
        self._seen: dict[int, int] = {}
        self.levels = [self.level(c) for c in range(max_n - 1, 0, -1)]
        self.row_levels: list[str | None] = []

    @staticmethod
    def level(match: int) -> str:
        """The level of drafts found after a match of ``match`` context tokens."""
        return f"ngram/{match}"

    def start(self, prompts: list[list[int]]) -> None:
        """Build the tables of each row (index = original row) from its prompt's tokens."""
        self.rows = {r: NGramTables(self.max_n, p) for r, p in enumerate(prompts)}
        self._seen = {r: 0 for r in self.rows}

    def prepare(self, session: Any) -> None:
        """Nothing before a step: the tables are updated as drafts are asked for."""

    def sync(self, row: int, generated: list[int]) -> None:
        """Ingest the tokens ``row`` emitted since the last call."""
        seen = self._seen[row]
        if len(generated) > seen:
            self.rows[row].update(generated[seen:])
            self._seen[row] = len(generated)

    def propose(self, row: int, generated: list[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens for ``row`` after its emitted ``generated`` tokens."""
        self.sync(row, generated)
        return self.rows[row].propose(k) if k > 0 else []

    def propose_rows(self, session: Any, caps: list[int]) -> list[list[int]]:
        """Up to ``caps[i]`` tokens for each active row of ``session`` (sets
        ``row_levels``)."""
        out, levels = [], []
        for r, c in zip(session.rows.tolist(), caps):
            p = self.propose(r, session.generated[r], c) if c > 0 else []
            out.append(p)
            levels.append(self.level(self.rows[r].match) if p else None)
        self.row_levels = levels
        return out
