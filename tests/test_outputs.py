"""Staged stage outputs: published only on success, the previous outputs untouched on any failure."""
import json

import pytest

from srmodels.core.files import staged, write_json


def test_success_replaces_entries_and_keeps_others(tmp_path):
    out, work = tmp_path / "data" / "fusion", tmp_path / "work"
    out.mkdir(parents=True)
    (out / ".gitignore").write_text("/best.pth\n")
    (out / "best.pth").write_text("old")
    with staged(out, work) as tmp:
        assert not (tmp / "best.pth").exists()  # a fresh folder, never the live outputs
        (tmp / "best.pth").write_text("new")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_text("png")
    assert (out / "best.pth").read_text() == "new" and (out / "plots" / "a.png").is_file()
    assert (out / ".gitignore").read_text() == "/best.pth\n"
    assert not any((work / "staging").iterdir())


def test_whole_folder_output_drops_stale_files(tmp_path):
    out, work = tmp_path / "cache" / "dat", tmp_path / "work"
    out.mkdir(parents=True)
    (out / "stale.npy").write_text("x")
    with staged(out, work, whole=True) as tmp:
        (tmp / "fresh.npy").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["fresh.npy"]


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_failure_leaves_the_previous_outputs_as_they_were(tmp_path, whole, error):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "metrics.json").write_text("previous")
    with pytest.raises(error):
        with staged(out, work, whole=whole) as tmp:
            (tmp / "metrics.json").write_text("half")
            raise error("half way")
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "previous"
    assert not any((work / "staging").iterdir())


def test_a_killed_run_leaves_nothing_that_survives_the_next_start(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    leftover = work / "staging" / str(out).strip("/").replace("/", "__")
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from a SIGKILLed run")
    with staged(out, work) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_json_is_deterministic(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1.5, "a": [1, 2]})
    write_json(tmp_path / "b.json", dict(reversed(list({"b": 1.5, "a": [1, 2]}.items()))))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1.5}
