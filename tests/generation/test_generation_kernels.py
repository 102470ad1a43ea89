"""``generate``'s kernel choice: same tokens, the user's model untouched, thread-safe."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers.lmkit import EOS, PAD, REQUIRED_FAMILIES, hf_greedy, left_padded, tiny_lm

from exitwise.generation import generate
from exitwise.policies import get_policy

NEW = 10


def snapshot(model: torch.nn.Module) -> list:
    return [
        (name, type(m), sorted(m.__dict__), m.forward.__func__, dict(m._forward_hooks),
         dict(m._forward_pre_hooks), [id(p) for p in m.parameters(recurse=False)])
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
@pytest.mark.parametrize("kernels", ["auto", "stock", "streaming", "packed"])
def test_every_kernel_choice_gives_greedy_tokens_and_leaves_the_model_alone(family, kernels):
    model = tiny_lm(family)
    before = snapshot(model)
    ids, mask = left_padded()
    ref = hf_greedy(model, ids, mask, NEW, eos=EOS)
    out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                   kernels=kernels)
    assert torch.equal(out.sequences, ref)
    assert snapshot(model) == before
    assert out.stats.kernels == kernels
    if kernels == "stock":
        assert out.stats.streamed_products == 0
    if kernels == "streaming":  # every family has nn.Linear products (GPT-2: its LM head)
        assert out.stats.streamed_products > 0


def test_an_exception_inside_generate_leaves_the_model_alone_and_ends_the_rerouting():
    model = tiny_lm("llama")
    before = snapshot(model)
    ids, mask = left_padded()

    def boom(row, tokens):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        generate(model, ids, mask, max_new_tokens=NEW, callback=boom, kernels="streaming")
    assert snapshot(model) == before
    x = torch.randn(1, 1, 32)
    lin = model.model.layers[0].mlp.up_proj
    with torch.inference_mode():  # no rerouting left behind: the stock product, bit for bit
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


STRATEGY_RUNS = {
    "self_speculative": dict(strategy="self_speculative", exit_layer=1, draft_len=3),
    "tree": dict(strategy="self_speculative", exit_layer=1, draft_len=3, tree_width=3),
    "layer_skip": dict(strategy="layer_skip", skip={"attn": [1], "mlp": [2]}, draft_len=2),
    "swift": dict(strategy="swift", context_window=2, draft_len=2),
    "early_exit": dict(strategy="early_exit", exit_layers=[1, 2], kv="skip",
                       policy=get_policy("calm_softmax", threshold=0.01)),
    "sampling": dict(strategy="self_speculative", exit_layer=1, draft_len=2, do_sample=True,
                     seed=0),
}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("run", sorted(STRATEGY_RUNS))
def test_every_strategy_leaves_the_model_alone_even_when_it_fails(family, run):
    # checked for greedy only before: drafting, trees, skipping and early exit reroute
    # blocks and attention too
    model = tiny_lm(family)
    before = snapshot(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = left_padded()
    generate(model, ids, mask, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
             **STRATEGY_RUNS[run])
    assert snapshot(model) == before

    def boom(row, tokens):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        generate(model, ids, mask, max_new_tokens=8, callback=boom, **STRATEGY_RUNS[run])
    assert snapshot(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_two_threads_decode_the_same_model_at_once():
    model = tiny_lm("llama")
    ids, mask = left_padded()
    alone = {
        k: generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                    kernels=k).sequences
        for k in ("stock", "streaming")
    }
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(k: str) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[k] = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                                  pad_token_id=PAD, kernels=k).sequences
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, seq in alone.items():
        assert torch.equal(got[k], seq)


def count_calls(module: torch.nn.Module, max_rows: int = 8) -> list[int]:
    """The row counts of the few-row calls of ``module`` from now on (a forward hook)."""
    rows: list[int] = []

    def hook(mod, args, out):
        x = args[0]
        if x.numel() // x.shape[-1] <= max_rows:
            rows.append(x.numel() // x.shape[-1])

    module.register_forward_hook(hook)
    return rows


def test_auto_reroutes_only_the_passes_whose_row_count_paid_in_the_whole_pass_check(
        monkeypatch):
    from exitwise.backbones import kernels as K

    class Tuner(K.KernelTuner):
        """Every shape streams alone; the whole pass pays from 2 rows on (as measured at one
        row on an AMD EPYC with SmolLM2)."""

        def __init__(self):
            super().__init__(None)
            self.probes: list[str] = []

        def _measure(self, weights, rows):
            return K.KernelDecision(True, 0.5, 1.0, 0.5)

        def check_stack(self, probe, rows, routed, stock=None, views=False):
            assert views  # decoding reroutes through views: their verdict
            self.probes.append(probe.key)
            return K.KernelDecision(rows >= 2, 0.5 if rows >= 2 else 1.2, 1.0, 1.0)

    tuner = Tuner()
    monkeypatch.setattr(K, "default_tuner", lambda: tuner)
    model = tiny_lm("llama")
    ids, mask = left_padded(lengths=(12,))  # a prefill of more rows than any reroute
    ref = hf_greedy(model, ids, mask, NEW, eos=EOS)
    opts = dict(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    heads = count_calls(model.lm_head)
    greedy = generate(model, ids, mask, **opts)  # one-row passes: blocks stock; the LM head,
    # a single product whose shape streams alone, rerouted at every step
    assert torch.equal(greedy.sequences, ref)
    assert heads and greedy.stats.streamed_products == len(heads)
    assert tuner.probes and set(tuner.probes) == {tuner.probes[0]}  # the model's own probe
    spec = generate(model, ids, mask, strategy="self_speculative", exit_layer=1, draft_len=2,
                    **opts)  # verification passes of 3 rows are rerouted
    assert torch.equal(spec.sequences, ref) and spec.stats.streamed_products > 0
