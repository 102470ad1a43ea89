"""Speculative *sampling* draws exactly from the full model's (processed) distribution.

1. Closed form: for one position, P(y) = q(y) min(1, p/q)(y) + P(reject) residual(y) == p(y),
   computed from the implementation's own acceptance / residual functions.
2. Monte Carlo on ``speculative_accept`` alone (synthetic p, q; many rows at once).
3. End to end: the joint law of the first three generated tokens of a 12-token LM, from
   thousands of sampled rows (self-speculative and plain), against the exact law enumerated
   from the HF model's own forward passes, with an independently written top-k / top-p.
4. Greedy (do_sample=False) is unchanged; top_k=1 sampling is greedy; seeds reproduce.
"""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, PAD, left_padded, tiny_lm
from scipy.stats import chisquare

from exitwise.generation import (
    SamplingConfig,
    acceptance_probability,
    generate,
    residual_distribution,
    speculative_accept,
)

V = 12
PROMPT = [3, 5, 7, 4]
NEW = 3  # tokens whose joint law is checked
ROWS = 8000
# Settings of the end-to-end test: temperature, top-k and top-p all active, so p and q have
# different supports (a draft outside p's support is always rejected; p's mass outside q's
# support only comes back through the residual).
PROCESS = dict(temperature=0.9, top_k=8, top_p=0.95)
# A correct sampler gives a chi-square statistic with p-value ~ U(0, 1); a fixed seed makes
# the test deterministic, and 1e-3 is a false alarm for one seed in a thousand. The same
# samples must *fail* against the un-corrected draft law (p-value < 1e-6): the test has power.
ALPHA = 1e-3


def small_lm(seed: int = 0):
    """A 4-layer Llama with a 12-token vocabulary; damped blocks and a sharpened LM head make
    layer-1 exits disagree with the last layer often (TV ~ 0.4) but not always."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.6)
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def lm():
    return small_lm()


# -- an independent reference of the processing (plain Python, one distribution) ----------
def ref_process(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    scores = [x / temperature for x in logits]
    kth = sorted(scores, reverse=True)[top_k - 1]
    kept = [s >= kth for s in scores]
    exps = [torch.tensor(s).exp().item() if k else 0.0 for s, k in zip(scores, kept)]
    z = sum(exps)
    probs = [e / z for e in exps]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    mass, nucleus = 0.0, set()
    for i in order:  # smallest prefix of most likely tokens reaching top_p
        if mass >= top_p or probs[i] == 0.0:
            break
        nucleus.add(i)
        mass += probs[i]
    z = sum(probs[i] for i in nucleus)
    return [probs[i] / z if i in nucleus else 0.0 for i in range(len(probs))]


def exact_law(model, layer: int | None, steps: int = NEW) -> dict[tuple[int, ...], float]:
    """Exact law of the first ``steps`` tokens when token 1 comes from the full model and every
    later token from layer ``layer``'s exit (None: the full model), by enumerating prefixes."""
    law = {(): 1.0}
    for step in range(steps):
        prefixes = list(law)
        ids = torch.tensor([PROMPT + list(pre) for pre in prefixes])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        if layer is None or step == 0:
            logits = out.logits[:, -1]
        else:  # the shared exit: final norm + LM head on the layer's hidden state
            logits = model.lm_head(model.model.norm(out.hidden_states[layer][:, -1]))
        new = {}
        for pre, row in zip(prefixes, logits.tolist()):
            for t, pt in enumerate(ref_process(row, **PROCESS)):
                if pt > 0:
                    new[pre + (t,)] = law[pre] * pt
        law = new
    return law


def chi2_pvalue(samples: torch.Tensor, law: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit of rows of ``samples`` (N, steps) to ``law``; cells expected
    fewer than 5 times are pooled (with anything outside the law's support)."""
    n = samples.shape[0]
    counts: dict[tuple[int, ...], int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    obs, exp = [], []
    pooled_obs, pooled_exp = 0, 0.0
    for cell, prob in law.items():
        if prob * n >= 5:
            obs.append(counts.pop(cell, 0))
            exp.append(prob * n)
        else:
            pooled_obs += counts.pop(cell, 0)
            pooled_exp += prob * n
    pooled_obs += sum(counts.values())  # outside the support: must not happen
    obs.append(pooled_obs)
    exp.append(max(pooled_exp, 1e-9))
    exp = [e * n / sum(exp) for e in exp]
    return float(chisquare(obs, exp).pvalue)


# -- 1. closed form ---------------------------------------------------------------------------
def _output_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(y) for one position: y drafted from q and kept, or rejected and drawn from residual."""
    keep = q * acceptance_probability(p, q)
    return keep + (1.0 - keep.sum(-1, keepdim=True)) * residual_distribution(p, q)


def _cases():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 10, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(6, 10, generator=g, dtype=torch.float64) * 2, -1)
    yield "random", p, q
    q_cut = q.clone()
    q_cut[:, :4] = 0  # p has mass where q has none
    yield "q_misses_support", p, q_cut / q_cut.sum(-1, keepdim=True)
    p_cut = p.clone()
    p_cut[:, 5:] = 0  # q drafts tokens p never emits
    yield "p_misses_support", p_cut / p_cut.sum(-1, keepdim=True), q
    yield "p_equals_q", p, p.clone()
    yield "q_one_hot", p, torch.eye(10, dtype=torch.float64)[:6]
    yield "p_one_hot", torch.eye(10, dtype=torch.float64)[:6], q


@pytest.mark.parametrize("name, p, q", list(_cases()), ids=[c[0] for c in _cases()])
def test_accept_or_resample_law_equals_p_in_closed_form(name, p, q):
    torch.testing.assert_close(_output_law(p, q), p, atol=1e-12, rtol=0)
    acc = acceptance_probability(p, q)
    assert ((acc >= 0) & (acc <= 1)).all()
    res = residual_distribution(p, q)
    torch.testing.assert_close(res.sum(-1), torch.ones(6, dtype=torch.float64))
    # P(reject) = TV(p, q)
    reject = 1.0 - (q * acc).sum(-1)
    torch.testing.assert_close(reject, 0.5 * (p - q).abs().sum(-1), atol=1e-12, rtol=0)


# -- 2. Monte Carlo on speculative_accept -----------------------------------------------------
def test_speculative_accept_matches_p_at_every_position():
    """Synthetic prefix-free 'models': position i has fixed p_i, q_i. The token emitted at
    position i (a kept draft, the residual draw, or the bonus draw from p_k) follows p_i."""
    g = torch.Generator().manual_seed(1)
    a, k, v = 200_000, 2, 6
    p = torch.softmax(torch.randn(k + 1, v, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v, generator=g) * 1.5, -1)
    drafts = torch.stack([torch.multinomial(q[i], a, True, generator=g) for i in range(k)], 1)
    accepted, nxt = speculative_accept(
        drafts, q[None].expand(a, k, v), p[None].expand(a, k + 1, v), g
    )
    # P(accept the first draft) = sum min(p0, q0)
    p_keep = float(torch.minimum(p[0], q[0]).sum())
    assert abs(float((accepted >= 1).float().mean()) - p_keep) < 0.005  # sd ~ 0.001
    # position 0's token: the first draft if kept, else the residual/bonus draw
    first = torch.where(accepted >= 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=v).float() / a
    # TV of an empirical law from 200k draws over 6 cells: E <= 0.5 * sqrt(6 / 200k) ~ 0.003
    assert 0.5 * float((freq - p[0]).abs().sum()) < 0.01
    # position 1, over rows that kept the first draft (p_1 holds whatever came before)
    rows = accepted >= 1
    second = torch.where(accepted[rows] >= 2, drafts[rows, 1], nxt[rows])
    freq = torch.bincount(second, minlength=v).float() / int(rows.sum())
    assert 0.5 * float((freq - p[1]).abs().sum()) < 0.015


# -- 3. end to end ----------------------------------------------------------------------------
DRAFTERS = {
    "self_speculative": dict(strategy="self_speculative", exit_layer=1, draft_len=3),
    "greedy": dict(strategy="greedy"),
    # n-gram drafts are point masses q: kept with probability p(x), else drawn from p minus x
    "anpd": dict(strategy="anpd", ngram=3, draft_len=3),
    "exit+ngram": dict(strategy="self_speculative", exit_layer=1, draft_len=3, ngram=2),
    # the model minus blocks drafts point masses too; SWIFT changes the set while sampling
    "layer_skip": dict(strategy="layer_skip", skip=[1, 2], draft_len=2),
    "swift": dict(strategy="swift", context_window=1, draft_len=2),
    # a token tree: the rejected draft's siblings tried against the residual law
    "tree": dict(strategy="self_speculative", exit_layer=1, draft_len=3, tree_width=3),
    # the exit's siblings by SWIFT's rule on the exit's own confidence
    "tree_confidence": dict(strategy="self_speculative", exit_layer=1, draft_len=3,
                            tree_width="confidence"),
    # the draft model's next choices as siblings: SWIFT's widths (1 candidate where the draft
    # is sure, so padded depths), and a fixed width
    "swift_tree": dict(strategy="swift", context_window=1, draft_len=3, tree_width="confidence"),
    "layer_skip_tree": dict(strategy="layer_skip", skip=[1, 2], draft_len=2, tree_width=3),
}


@pytest.mark.parametrize("strategy", list(DRAFTERS))
def test_first_tokens_follow_the_full_models_processed_law(lm, strategy):
    ids = torch.tensor([PROMPT]).repeat(ROWS, 1)
    out = generate(
        lm, ids, max_new_tokens=NEW + 1, eos_token_id=[], do_sample=True,
        seed=0, **PROCESS, **DRAFTERS[strategy],
    )
    samples = out.sequences[:, len(PROMPT) : len(PROMPT) + NEW]
    assert chi2_pvalue(samples, exact_law(lm, None)) > ALPHA
    if strategy in ("anpd", "exit+ngram"):
        s = out.stats
        assert 0 < s.ngram_accepted < s.ngram_drafted  # n-gram drafts kept and rejected
    if strategy in ("tree", "tree_confidence", "swift_tree", "layer_skip_tree"):
        assert out.stats.sibling_accepted > 0
    if strategy == "self_speculative":
        s = out.stats
        assert 0.2 < s.acceptance_rate < 0.95  # both kept and rejected drafts were exercised
        assert len(set(s.accepted)) > 1  # ragged per-row acceptance
        # power: the same samples are far from what un-corrected drafts would give
        assert chi2_pvalue(samples, exact_law(lm, 1)) < 1e-6


def test_sampling_processing_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, V, generator=g) * 3
    mine = SamplingConfig(True, **PROCESS).probs(logits)
    ref = torch.tensor([ref_process(row, **PROCESS) for row in logits.tolist()])
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    assert ((mine > 0).sum(-1) <= PROCESS["top_k"]).all()


# -- 4. greedy unchanged, degenerate sampling, seeds -------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


@pytest.mark.parametrize("strategy", ["greedy", "self_speculative"])
def test_greedy_unchanged_and_top_k_one_is_greedy(llama, strategy):
    ids, mask = left_padded()
    opts = dict(strategy=strategy, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    if strategy == "self_speculative":
        opts.update(exit_layer=2, draft_len=3)
    ref = generate(llama, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    plain = generate(llama, ids, mask, **opts)
    ignored = generate(llama, ids, mask, temperature=0.3, top_k=5, top_p=0.5, seed=1, **opts)
    # values a draw could not use are ignored too, as HF's generate does (they were refused)
    zero = generate(llama, ids, mask, temperature=0.0, top_p=0.0, top_k=-1, **opts)
    top1 = generate(llama, ids, mask, do_sample=True, top_k=1, seed=2, **opts)
    for out in (plain, ignored, zero, top1):
        assert torch.equal(out.sequences, ref.sequences)
    if strategy == "self_speculative":  # p and q one-hot: the test keeps exactly the matches
        assert top1.stats.accepted == plain.stats.accepted


@pytest.mark.parametrize("strategy", ["greedy", "self_speculative"])
def test_seed_reproduces_and_generator_is_used(llama, strategy):
    ids, mask = left_padded()
    opts = dict(strategy=strategy, max_new_tokens=12, eos_token_id=[], do_sample=True)
    if strategy == "self_speculative":
        opts.update(exit_layer=1, draft_len=4)
    a = generate(llama, ids, mask, seed=7, **opts)
    b = generate(llama, ids, mask, seed=7, **opts)
    c = generate(llama, ids, mask, generator=torch.Generator().manual_seed(7), **opts)
    d = generate(llama, ids, mask, seed=8, **opts)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.sequences, d.sequences)
    assert a.stats.new_tokens == [12, 12, 12]


def test_sampling_through_a_multi_exit_model_head():
    """A trained-style exit (own adapter, calibration temperature) drafts; ragged rows."""
    import exitwise as ew

    model = tiny_lm("qwen2", seed=2)
    config = ew.ExitConfig(
        layers=[2], head="lm", num_labels=100, head_kwargs={"adapter": "mlp"},
        final_head_kwargs={},
    )
    multi = ew.attach_exits(model, config).eval()
    with torch.no_grad():
        multi.temperatures.fill_(1.3)
    ids, mask = left_padded()
    out = generate(
        multi, ids, mask, strategy="self_speculative", exit_layer=2, draft_len=3,
        max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=0.7, seed=0,
    )
    assert out.stats.new_tokens == [12, 12, 12]
    assert 0 < out.stats.total_accepted < out.stats.total_drafted
    assert (out.sequences[:, ids.shape[1] :] < 100).all()
