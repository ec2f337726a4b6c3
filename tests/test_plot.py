"""`promptkd plot`'s collapse mark on PromptKD's distances panel, read from the run itself."""

import yaml

from promptkd.evaluation import plot

PNG = b"\x89PNG\r\n\x1a\n"


def _records(kl, drift):
    return [{"step": st, "student/loss": 1.0, "prompt/kl_to_student": k, "prompt/drift": d}
            for st, (k, d) in enumerate(zip(kl, drift, strict=True), 1)]


def _write_config(run, method="promptkd", **promptkd):
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "promptkd": promptkd}))


def test_settings_come_from_the_runs_config_and_are_empty_when_it_says_nothing(tmp_path):
    run = tmp_path / "run"
    assert plot.read_promptkd_settings(run) == {}  # no directory, no config
    _write_config(run, collapse_window=5)
    assert plot.read_promptkd_settings(run) == {"collapse_window": 5}
    _write_config(run, max_drift=0.1, collapse_window=5)  # a run of an older promptkd: its guard is not drawn
    assert plot.read_promptkd_settings(run) == {"collapse_window": 5}
    _write_config(run, method="gkd", collapse_window=5)
    assert plot.read_promptkd_settings(run) == {}
    (run / "config.yaml").write_text("method: [promptkd\n")  # not YAML
    assert plot.read_promptkd_settings(run) == {}


def test_the_mark_follows_the_trainers_collapse_rule():
    # steps 3-6 collapsed (kl_to_student below drift); step 8 again, alone
    kl = [1.0, 0.9, 0.2, 0.2, 0.2, 0.2, 0.9, 0.2]
    drift = [0.1, 0.1, 0.3, 0.3, 0.3, 0.3, 0.1, 0.3]
    records = _records(kl, drift)
    assert plot.distance_marks(records, {"collapse_window": 3}) == {"warned": 5}
    assert plot.distance_marks(records, {"collapse_window": 5})["warned"] is None  # 4 in a row < 5
    assert plot.distance_marks(records, {}) == {"warned": None}


def test_plot_of_a_collapsing_run_is_written(tmp_path):
    run = tmp_path / "run"
    _write_config(run, collapse_window=3)
    records = _records([1.5, 1.2, 0.2, 0.2, 0.2, 0.2], [0.03, 0.05, 0.3, 0.3, 0.3, 0.3])
    out = plot.plot_metrics(records, tmp_path / "figs" / "m.png", plot.read_promptkd_settings(run))
    assert out.read_bytes()[:8] == PNG
