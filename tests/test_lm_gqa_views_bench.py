"""The GQA-view benchmark (``benchmarks/lm_gqa_views.py``) on a tiny chat LM with key/value
groups: both arms run, their tokens agree, and the views are switched back on afterwards."""

from __future__ import annotations

import json

from benchmarks.lm_gqa_views import _VIEW, main, views
from exitwise.backbones.hf_decoder import HFDecoderBackbone


def test_views_on_and_off_timed_and_identical(tiny_lm_dir, tmp_path):
    out = tmp_path / "gqa.json"
    report = main(["--model", str(tiny_lm_dir), "--exit-layer", "1", "--threads", "1",
                   "--contexts", "8", "--rows", "1,3", "--repeats", "2", "--prompts", "2",
                   "--new-tokens", "6", "--decode-repeats", "1", "--out", str(out)])
    assert report["key_value_groups"] > 1  # the tiny Llama has groups: the views are used
    rows = report["passes"]["8"]
    assert set(rows) == {"1", "3"}
    assert all(r["ms_views"] > 0 and r["ms_no_views"] > 0 for r in rows.values())
    decoding = report["decoding"]
    assert decoding["identical"] is True and decoding["tokens_per_s_views"] > 0
    assert json.loads(out.read_text())["decoding"] == decoding
    # the switch is the benchmark's own and is undone
    with views(False):
        assert HFDecoderBackbone._attention_view is not _VIEW
    assert HFDecoderBackbone._attention_view is _VIEW
