"""benchmarks/list_wall_time.py: a failing CLI run stops the benchmark with the CLI's own error
(a time of a run that failed would be a figure of nothing), and a list too short to time is
refused before anything runs."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    path = os.path.join(REPO, "benchmarks", "list_wall_time.py")
    spec = importlib.util.spec_from_file_location("list_wall_time", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failing_run_raises_with_the_cli_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(RuntimeError, match="no_such_model"):
        _script().timed(["unlearn", "--model", missing, "--concept", "a cat",
                         "--out", str(tmp_path / "x.safetensors")], threads=1)
    assert not (tmp_path / "x.safetensors").exists()


def test_one_concept_is_refused_before_any_run(monkeypatch, capsys):
    mod = _script()
    ran = []
    monkeypatch.setattr(mod, "timed", lambda *a, **k: ran.append(a) or 1.0)
    monkeypatch.setattr("sys.argv", ["list_wall_time.py", "--concepts", "stripes style"])
    with pytest.raises(SystemExit):
        mod.main()
    assert not ran
    assert "at least 2 concepts" in capsys.readouterr().err
