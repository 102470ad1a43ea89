"""Where exitwise looks for data and keeps its cache: from the environment or the working
directory, never relative to the installed package."""

from __future__ import annotations

from exitwise.paths import cache_root, data_root
from exitwise.lm.prompts import find_text_data
from exitwise.recipes.sources import default_sst2


def test_data_root_from_the_environment_then_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("EXITWISE_DATA", raising=False)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data_root() is None and default_sst2() == "glue/sst2" and find_text_data() is None
    shared = tmp_path / "shared" / "data"
    (shared / "sst2").mkdir(parents=True)
    (shared / "sst2" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    assert data_root() == shared.resolve()
    assert default_sst2() == str(shared.resolve() / "sst2")
    assert find_text_data() == shared.resolve()
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    monkeypatch.setenv("EXITWISE_DATA", str(elsewhere))
    assert data_root() == elsewhere and default_sst2() == "glue/sst2"  # no sst2/ there
    assert default_sst2("my/folder") == "my/folder"


def test_cache_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITWISE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
