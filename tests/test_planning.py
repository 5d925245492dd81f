import pytest

from shortgpt_export.errors import PlanError
from shortgpt_export.planning import Plan, make_plan, parse_layer_list

SCORES = [0.9, 0.2, 0.05, 0.3, 0.1, 0.6, 0.15, 0.8]


def test_remove_n_takes_lowest_scores():
    plan = make_plan(8, SCORES, remove=3)
    assert plan.remove == [2, 4, 6]
    assert plan.keep == [0, 1, 3, 5, 7]
    assert plan.reason == "remove 3 lowest-BI layers"


def test_default_is_a_quarter_rounded_down():
    assert len(make_plan(8, SCORES).remove) == 2
    assert len(make_plan(30, [float(i) for i in range(30)]).remove) == 7


def test_ratio_and_explicit_layers():
    assert make_plan(8, SCORES, ratio=0.5).remove == [1, 2, 4, 6]
    plan = make_plan(8, SCORES, layers=[7, 0])
    assert plan.remove == [0, 7] and plan.keep == [1, 2, 3, 4, 5, 6]


def test_ties_are_broken_by_index():
    assert make_plan(4, [0.1, 0.1, 0.1, 0.5], remove=2).remove == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remove": 8}, "--remove 8 is not possible for a model with 8 layers"),
        ({"remove": -1}, "--remove -1 is not possible"),
        ({"ratio": 1.0}, r"--ratio 1.0 is outside \[0, 1\)"),
        ({"ratio": -0.1}, r"--ratio -0.1 is outside"),
        ({"layers": [8]}, r"layer indices \[8\] are out of range for a model with 8 layers"),
        ({"layers": [-1]}, r"layer indices \[-1\] are out of range"),
        ({"layers": [2, 2]}, "repeats an index"),
        ({"layers": list(range(8))}, "cannot remove all 8 layers"),
        ({"remove": 2, "ratio": 0.2}, "only one of"),
    ],
)
def test_bad_requests_are_rejected(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(8, SCORES, **kwargs)


def test_parse_layer_list():
    assert parse_layer_list("3,7, 11") == [3, 7, 11]
    with pytest.raises(PlanError, match="not a comma-separated list"):
        parse_layer_list("3;7")


def test_plan_json_round_trip_and_validation(tmp_path):
    plan = make_plan(8, SCORES, remove=2)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text(
        '{"num_layers": 4, "remove": [5], "keep": [0,1,2,3], "metric": "bi", "reason": "x"}'
    )
    with pytest.raises(PlanError, match="out of range"):
        Plan.load(tmp_path / "bad.json")
