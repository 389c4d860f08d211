from training.configs import CONFIGS, SEED_STUDY
from training.study import run_study


def test_every_configuration_builds_documented_and_distinct():
    from training.configs import TrainConfig
    assert set(SEED_STUDY) <= set(CONFIGS)
    fields = [tuple(v for k, v in c.to_dict().items() if k not in ("name", "description", "reported_accuracy",
                                                                     "reported_epochs"))
              for c in CONFIGS.values()]
    assert len(set(fields)) == len(fields), "two configurations train the same thing"
    assert all(isinstance(c, TrainConfig) and c.description for c in CONFIGS.values())
    assert CONFIGS["final"].epochs == 275 and CONFIGS["final"].fine_tune_epochs == 25


def test_the_whole_seed_study_runs_end_to_end_at_a_small_budget(data_dir, tmp_path):
    names = SEED_STUDY + ["fast"]
    table = run_study(names, tmp_path, epochs=1, data=data_dir, train_limit=1024, test_limit=64).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == names
    assert "| 82.37% |" in table and "90.87% (275 ep)" in table
    for name in names:
        assert (tmp_path / name / "history.png").is_file()
        assert (tmp_path / name / "evaluation" / "confusion_matrix.png").is_file()
