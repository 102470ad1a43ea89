"""ExitConfig: exit placement specs and validation."""

from __future__ import annotations

import pytest

from exitwise import ExitConfig
from exitwise.errors import ConfigError


@pytest.mark.parametrize(
    "spec, depth, expected",
    [
        ("all", 4, [1, 2, 3, 4]),
        (1, 4, [1, 2, 3, 4]),
        (2, 4, [2, 4]),
        (3, 4, [3, 4]),  # the final block always carries an exit
        (5, 4, [4]),
        ("every:2", 6, [2, 4, 6]),
        ("every:4", 6, [4, 6]),
        ([1, 3], 4, [1, 3, 4]),
        ([3, 1, 1, 4], 4, [1, 3, 4]),
        ((2,), 4, [2, 4]),
        ([], 4, [4]),
        ([12], 12, [12]),
    ],
)
def test_resolve_layers(spec, depth, expected):
    assert ExitConfig(layers=spec).resolve_layers(depth) == expected


@pytest.mark.parametrize("bad", [[0, 2], [2, 5], [-1]])
def test_out_of_range_depths_name_the_valid_range(bad):
    with pytest.raises(ConfigError) as err:
        ExitConfig(layers=bad).resolve_layers(4)
    msg = str(err.value)
    assert "1..4" in msg and "4 layers" in msg
    assert str([d for d in bad if not 1 <= d <= 4]) in msg


@pytest.mark.parametrize(
    "bad, match",
    [
        ("every:x", "every:K"),
        ("every:0", ">= 1"),
        (0, ">= 1"),
        (-2, ">= 1"),
        ("some", "'all'"),
        (True, "'all'"),
        (1.5, "'all'"),
        (["1", "2"], "'all'"),
        (None, "'all'"),
    ],
)
def test_bad_layer_specs(bad, match):
    with pytest.raises(ConfigError, match=match):
        ExitConfig(layers=bad).resolve_layers(4)


@pytest.mark.parametrize("bad", [0, -1, "2", 2.0, True])
def test_num_labels_must_be_positive_int(bad):
    with pytest.raises(ConfigError, match="num_labels"):
        ExitConfig(num_labels=bad)


def test_dict_round_trip_is_json_friendly():
    cfg = ExitConfig(layers=(1, 3), head="mlp", num_labels=5, final_head="pooler",
                     head_kwargs={"hidden_features": 7}, dropout=0.2)
    data = cfg.to_dict()
    assert data["layers"] == [1, 3]  # tuples become lists (JSON)
    again = ExitConfig.from_dict({**data, "written_by_a_newer_version": True})
    assert again == cfg
    assert again.resolve_layers(4) == [1, 3, 4]


def test_per_exit_heads_as_a_list_a_mapping_and_with_a_final_head():
    depths = [1, 2, 3, 4]
    cfg = ExitConfig(head=["mlp", "mlp", "linear", "pooler"], head_kwargs=[{"a": 1}, {}, {}, {}])
    assert [cfg.head_for(k, depths)[0] for k in range(4)] == ["mlp", "mlp", "linear", "pooler"]
    assert cfg.head_for(0, depths)[1] == {"a": 1} and cfg.head_name == "mlp"
    short = ExitConfig(head=["mlp", "mlp", "linear"], final_head="pooler")
    assert [short.head_for(k, depths)[0] for k in range(4)] == ["mlp", "mlp", "linear", "pooler"]
    mapping = ExitConfig(head={1: "mlp", "2": "mlp", 3: "linear", 4: "mean"},
                         head_kwargs={"3": {"x": 2}})
    assert mapping.head == {1: "mlp", 2: "mlp", 3: "linear", 4: "mean"}
    assert mapping.head_for(2, depths) == ("linear", {"x": 2})
    assert mapping.head_for(0, depths) == ("mlp", {})
    shared = ExitConfig(head="mlp", head_kwargs={"hidden_features": 8})  # not per depth
    assert shared.head_for(3, depths) == ("mlp", {"hidden_features": 8})
    # JSON round trip keeps the per-depth choices
    import json

    again = ExitConfig.from_dict(json.loads(json.dumps(mapping.to_dict())))
    assert [again.head_for(k, depths) for k in range(4)] == [
        mapping.head_for(k, depths) for k in range(4)]


@pytest.mark.parametrize("head, match", [
    (["mlp", "mlp"], "2 names for 4 exits"),
    ({1: "mlp", 2: "mlp", 3: "mlp"}, "depth 4"),
])
def test_per_exit_heads_must_cover_every_exit(head, match):
    with pytest.raises(ConfigError, match=match):
        ExitConfig(head=head).head_for(3, [1, 2, 3, 4])


@pytest.mark.parametrize("head", [[], "", [1, "mlp"], {1: 2}])
def test_bad_head_specs(head):
    with pytest.raises(ConfigError, match="head"):
        ExitConfig(head=head)


@pytest.mark.parametrize("cfg, match", [
    (ExitConfig(head="mlp", head_kwargs={2: {"hidden_features": 4}}), r"depths \[2\]"),
    (ExitConfig(head="mlp", head_kwargs={3: {}, 7: {}}), r"depths \[7\]"),
    (ExitConfig(head={1: "mlp", 2: "mlp", 3: "linear", 4: "mean"}), r"depths \[2\]"),
    (ExitConfig(head="mlp", head_kwargs=[{}, {}]), "2 option dicts for 3 exits"),
])
def test_per_depth_entries_must_name_exits(cfg, match):
    # entries for depths with no exit (a typo, exits placed elsewhere) were dropped silently
    # and the exits got default options
    with pytest.raises(ConfigError, match=match):
        cfg.check_depths([1, 3, 4])


def test_per_depth_entries_that_name_exits_pass():
    ExitConfig(head={1: "mlp", 3: "linear", 4: "mean"}, head_kwargs={3: {}}).check_depths([1, 3, 4])
    ExitConfig(head="mlp", head_kwargs=[{}, {}], final_head="linear").check_depths([1, 3, 4])
    ExitConfig(head="mlp", head_kwargs={"hidden_features": 4}).check_depths([1, 3, 4])
