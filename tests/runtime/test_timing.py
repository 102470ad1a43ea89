"""The timing helpers: interleaved order, medians, and the batches a data loader gives (no
assertion on how fast anything is: speed is measured in benchmarks, not tests)."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.runtime.timing import measure_speedups, rotation, time_interleaved


def test_rotation_lets_every_function_run_first_equally_often():
    names = ["a", "b", "c"]
    assert [rotation(names, k) for k in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in names}
    samples = time_interleaved(fns, repeats=3, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(s) == 3 and min(s) >= 0 for s in samples.values())


def test_speedups_are_the_ratio_of_medians_and_loader_batches_are_read():
    # (images, labels) batches of a torchvision loader failed with a bare TypeError
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU()) for c in (1, 4)]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6)),
                            ew.ExitConfig(layers="all", head="sdn", num_labels=3)).eval()
    x = torch.randn(4, 1, 6, 6)
    for batches in ([(x, torch.zeros(4, dtype=torch.long))], [{"pixel_values": x}],
                    [{"pixel_values": x, "labels": torch.zeros(4, dtype=torch.long)}]):
        got = measure_speedups(model, batches, {"never": ew.get_policy("never")}, repeats=3)
        base = statistics.median(got["baseline"]["samples_s"])
        med = statistics.median(got["never"]["samples_s"])
        assert got["never"]["median_s"] == med and got["baseline"]["median_s"] == base
        assert got["never"]["speedup"] == base / med


def test_every_sample_waits_for_the_device_and_baseline_is_a_reserved_name(monkeypatch):
    # on a GPU the baseline was timed at kernel-launch speed (no synchronize); here the wait
    # is counted: once at the end of every call of every configuration, warm-up included
    import exitwise.runtime.timing as timing
    from exitwise.errors import ConfigError

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 6, 6)),
                            ew.ExitConfig(layers="all", head="sdn", num_labels=3)).eval()
    assert timing.device_sync(model)() is None  # a CPU model: nothing to wait for
    waits = []
    monkeypatch.setattr(timing, "device_sync", lambda m: lambda: waits.append(1))
    batches = [{"pixel_values": torch.randn(2, 1, 6, 6)}] * 3
    policies = {"never": ew.get_policy("never"), "all": ew.get_policy("confidence", threshold=0)}
    timing.measure_speedups(model, batches, policies, repeats=2, warmup=1)
    assert len(waits) == (1 + 2) * 3  # (warm-up + repeats) x (baseline + two policies)
    with pytest.raises(ConfigError, match="baseline"):
        timing.measure_speedups(model, batches, {"baseline": ew.get_policy("never")})
