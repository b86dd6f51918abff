"""A sampled cohort's round time: the slowest member of the cohorts the run will draw."""

from fedpipe.planning.cohorts import cohort_round_times


def test_a_rare_slow_server_sets_the_p90_not_the_mean():
    # 1 slow server of 10, cohorts of 2: it is in a cohort with chance 0.2
    size, mean, p90 = cohort_round_times([10.0, 1.0], [1, 9], 2, stratify=False, seed=0)
    assert size == 2 and abs(mean - (1 + 9 * 0.2)) < 0.3 and p90 == 10.0
    assert cohort_round_times([10.0, 1.0], [1, 9], 0.5, stratify=True, seed=0)[0] == 5
    assert cohort_round_times([10.0, 1.0], [1, 9], 10, stratify=False, seed=0)[1:] == (10.0, 10.0)


def test_show_prints_the_cohort_round_time():
    from pathlib import Path

    from typer.testing import CliRunner

    from fedpipe.cli import app

    plan = Path(__file__).parents[2] / "plans" / "fleet-64.plan.yaml"
    result = CliRunner().invoke(app, ["show", str(plan)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "cohort of 8 per round: round time" in result.output, result.output
