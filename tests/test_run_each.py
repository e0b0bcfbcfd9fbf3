"""The suite's runner (tests/run_each.py) says which files ran no test, instead of counting them as passed."""

from __future__ import annotations

from tests import run_each


def test_a_file_whose_tests_were_all_skipped_is_named_and_not_counted_as_passed(tmp_path, capsys):
    (tmp_path / "test_runs.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\n@pytest.mark.skip(reason='no GPU here')\n"
                                            "def test_gpu():\n    pass\n")
    (tmp_path / "test_fails.py").write_text("def test_wrong():\n    assert 1 + 1 == 3\n")
    assert run_each.main(["-p", "no:cacheprovider"], root=tmp_path) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "1 passed, 1 failed, 1 skipped"
    assert out[-2] == "no test ran in 1 files (see their skip reasons above): test_skips.py"
    assert "failed: test_fails.py (exit 1)" in out[-3]
