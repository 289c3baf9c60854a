"""Early stopping: behaviour tables for the pure rule, state round trips, config errors."""

from __future__ import annotations

import math
import pickle

import pytest
from pydantic import ValidationError

from raytorch.core.stopping import (
    Decision,
    EarlyStopping,
    Mode,
    StopperState,
    StopReason,
    default_mode,
    evaluate_history,
    step,
)

NAN, INF = math.nan, math.inf


def _replay(config: EarlyStopping, values: list[float]):
    """Replay values measured at iterations 0, 10, 20, ...; return (state, decision, stop index)."""
    state, decision, stop_it = evaluate_history(config, [(10 * i, v) for i, v in enumerate(values)])
    return state, decision, None if stop_it is None else stop_it // 10


def _best_index(state: StopperState) -> int | None:
    return None if state.best_iteration is None else state.best_iteration // 10


# (values, patience, min_delta, mode) -> (index of the stopping value or None, index of the best)
PATIENCE_TABLE = [
    ([5.0, 4.0, 3.0, 3.5, 3.2], 2, 0.0, "min", 4, 2),
    ([5.0, 4.0, 3.0, 2.0, 1.0], 2, 0.0, "min", None, 4),
    ([3.0, 4.0, 4.0, 2.0, 5.0, 5.0, 5.0], 3, 0.0, "min", 6, 3),  # an improvement resets the wait
    ([1.0, 1.0], 1, 0.0, "min", 1, 0),  # equal to the best is not an improvement
    ([1.0, 0.5], 1, 0.5, "min", 1, 0),  # exactly best - min_delta: not an improvement
    ([1.0, 0.25], 1, 0.5, "min", None, 1),  # beyond min_delta: an improvement
    ([1.0, 0.75, 0.5, 0.25], 2, 0.5, "min", 2, 0),  # small steps never beat min_delta
    ([0.5, 0.6, 0.6, 0.55], 2, 0.0, "max", 3, 1),
    ([0.5, 0.75, 1.0], 1, 0.25, "max", 1, 0),  # exactly best + min_delta: not an improvement
    ([0.5, 1.0], 1, 0.25, "max", None, 1),
    ([0.5, 0.4, 0.3, 0.2], 3, 0.0, "max", 3, 0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], None, 0.0, "min", None, 0),  # patience None: never stops
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0, 0.0, "min", None, 0),  # patience 0: never stops
    ([7.0], 1, 0.0, "min", None, 0),  # the first value always improves
]


@pytest.mark.parametrize(
    ("values", "patience", "min_delta", "mode", "stop_index", "best_index"), PATIENCE_TABLE
)
def test_patience_table(values, patience, min_delta, mode, stop_index, best_index):
    config = EarlyStopping(mode=mode, patience=patience, min_delta=min_delta)
    state, decision, stopped_at = _replay(config, values)
    assert stopped_at == stop_index
    assert _best_index(state) == best_index
    assert decision.stop is (stop_index is not None)
    expected = StopReason.NO_IMPROVEMENT if stop_index is not None else StopReason.NOT_STOPPED
    assert decision.reason is expected
    # values after the stop are not replayed
    assert len(state.history) == (len(values) if stop_index is None else stop_index + 1)


# (config kwargs, values) -> (index of the stopping value or None, reason, index of the best)
MIN_NO_CHECK = {"mode": "min", "patience": 2, "check_finite": False}
RULE_TABLE = [
    ({"mode": "min", "threshold": 0.5}, [1.0, 0.7, 0.5, 0.4], 2, StopReason.THRESHOLD_REACHED, 2),
    ({"mode": "max", "threshold": 0.9}, [0.5, 0.95, 0.99], 1, StopReason.THRESHOLD_REACHED, 1),
    ({"mode": "min", "divergence_threshold": 10.0}, [1.0, 10.0, 11.0], 2, StopReason.DIVERGED, 0),
    ({"mode": "max", "divergence_threshold": 0.1}, [0.5, 0.05], 1, StopReason.DIVERGED, 0),
    ({"mode": "min", "patience": 5}, [1.0, NAN, 0.5], 1, StopReason.NON_FINITE, 0),
    ({"mode": "min", "patience": 5}, [INF], 0, StopReason.NON_FINITE, None),
    ({"mode": "max"}, [0.5, -INF], 1, StopReason.NON_FINITE, 0),
    # check_finite=False: non-finite values are recorded but never improve, not even the first
    (MIN_NO_CHECK, [1.0, NAN, 0.5], None, StopReason.NOT_STOPPED, 2),
    (MIN_NO_CHECK, [NAN, 2.0, 3.0], None, StopReason.NOT_STOPPED, 1),
    (MIN_NO_CHECK, [1.0, NAN, INF], 2, StopReason.NO_IMPROVEMENT, 0),
    # the threshold is checked before patience: 1.0 misses min_delta but reaches the threshold
    (
        {"mode": "min", "patience": 1, "min_delta": 5.0, "threshold": 1.0},
        [2.0, 1.0],
        1,
        StopReason.THRESHOLD_REACHED,
        0,
    ),
]


@pytest.mark.parametrize(("kwargs", "values", "stop_index", "reason", "best_index"), RULE_TABLE)
def test_rule_table(kwargs, values, stop_index, reason, best_index):
    state, decision, stopped_at = _replay(EarlyStopping(**kwargs), values)
    assert stopped_at == stop_index
    assert _best_index(state) == best_index
    assert decision.reason is reason
    assert decision.stop is (stop_index is not None)


def test_no_improvement_message_names_metric_margin_and_best():
    config = EarlyStopping(mode="min", patience=4, min_delta=0.001)
    history = [(25, 0.3), (50, 0.25), (75, 0.2312), (100, 0.232), (125, 0.24), (150, 0.25)]
    history.append((175, 0.2305))  # better, but not by more than min_delta
    _, decision, stop_it = evaluate_history(config, history)
    assert stop_it == 175
    assert decision.message == (
        "valid/objective did not improve by more than 0.001 for 4 validations; "
        "best 0.2312 at iteration 75"
    )


def test_messages_for_other_decisions():
    config = EarlyStopping(listen="valid/accuracy", patience=3, threshold=0.99)
    state, first = step(config, StopperState(), 0.5, 0)
    assert (first.improved, first.stop) == (True, False)
    assert first.message == "valid/accuracy improved to 0.5 at iteration 0"
    state, second = step(config, state, 0.4, 10)
    assert second.message == (
        "valid/accuracy did not improve for 1 validation (patience 3); best 0.5 at iteration 0"
    )
    _, nan = step(config, state, NAN, 20)
    assert "valid/accuracy is nan at iteration 20" in nan.message
    assert "check_finite=False" in nan.message
    _, done = step(config, state, 0.995, 30)
    assert done.message == "valid/accuracy reached 0.995 >= threshold 0.99 at iteration 30"


def test_step_is_pure():
    config = EarlyStopping(patience=2)
    state, _ = step(config, StopperState(), 1.0, 0)
    before = state.model_dump()
    new_state, _ = step(config, state, 2.0, 10)
    assert state.model_dump() == before
    assert new_state.wait == 1
    assert new_state.history == [(0, 1.0), (10, 2.0)]


@pytest.mark.parametrize("via_json", [False, True])
def test_state_round_trip_mid_way(via_json):
    # NaN in the history (check_finite=False) must survive the JSON round trip too
    config = EarlyStopping(mode="min", patience=3, min_delta=0.01, check_finite=False)
    values = [(i * 5, v) for i, v in enumerate([2.0, 1.5, NAN, 1.45, 1.2, 1.3, 1.25, 1.195, 1.3])]
    all_state, all_decision, all_stop = evaluate_history(config, values)
    # 1.195 misses min_delta: the third validation without improvement since 1.2 at iteration 20
    assert all_stop == 35
    assert all_state.best_iteration == 20

    half_state, _, half_stop = evaluate_history(config, values[:4])
    assert half_stop is None
    if via_json:
        loaded = StopperState.model_validate_json(half_state.model_dump_json())
    else:
        loaded = StopperState.model_validate(half_state.model_dump())
    rest_state, rest_decision, rest_stop = evaluate_history(config, values[4:], state=loaded)

    assert rest_stop == all_stop
    assert rest_decision == all_decision
    assert rest_state.model_dump(exclude={"history"}) == all_state.model_dump(exclude={"history"})
    assert [it for it, _ in rest_state.history] == [it for it, _ in all_state.history]
    assert math.isnan(rest_state.history[2][1])


def test_evaluate_history_without_values_does_not_stop():
    state, decision, stop_it = evaluate_history(EarlyStopping(patience=1), [])
    assert (stop_it, decision.stop, decision.reason) == (None, False, StopReason.NOT_STOPPED)
    assert state == StopperState()


def test_decision_and_state_are_frozen():
    decision = Decision(stop=False, reason=StopReason.NOT_STOPPED, improved=True, message="m")
    with pytest.raises(ValidationError, match="frozen"):
        decision.stop = True  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        StopperState().wait = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("listen", "mode", "expected"),
    [
        ("objective", None, Mode.MIN),
        ("valid/accuracy", None, Mode.MAX),
        ("valid/my_loss", None, Mode.MIN),
        ("train/mae", None, Mode.MIN),
        ("valid/f1", None, Mode.MAX),
        ("valid/accuracy", "min", Mode.MIN),  # an explicit mode wins over the guess
        ("objective", "MAX", Mode.MAX),
    ],
)
def test_mode_defaults_from_listen(listen, mode, expected):
    assert EarlyStopping(listen=listen, mode=mode).mode is expected


def test_default_mode_prefers_higher_is_better():
    assert default_mode("valid/error_rate", higher_is_better=True) is Mode.MAX
    assert default_mode("valid/accuracy", higher_is_better=False) is Mode.MIN


def test_key_adds_the_validation_split():
    assert EarlyStopping().key == "valid/objective"
    assert EarlyStopping(listen="train/objective").key == "train/objective"


def test_str_of_enums_is_the_value():
    assert str(StopReason.NO_IMPROVEMENT) == "no_improvement"
    assert f"{Mode.MAX}" == "max"
    assert StopReason("diverged") is StopReason.DIVERGED


def test_config_errors_are_collected_and_name_the_fix():
    with pytest.raises(ValidationError) as info:
        EarlyStopping(patience=-1, min_delta=-0.1, threshold=NAN, patiance=3)
    text = str(info.value)
    assert "4 validation errors" in text
    assert "patience=-1 is negative; use a number of validations >= 1, or 0/None" in text
    assert "min_delta=-0.1 must be a finite number >= 0" in text
    assert "threshold=nan must be finite" in text
    assert "patiance" in text and "Extra inputs are not permitted" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "min", "threshold": 2.0, "divergence_threshold": 1.0}, "must be below"),
        ({"mode": "max", "threshold": 0.5, "divergence_threshold": 0.9}, "must be above"),
        ({"mode": "up"}, "mode='up' is not a mode; use 'min', 'max'"),
        ({"listen": "valid/"}, "listen='valid/' names no metric"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        EarlyStopping(**kwargs)


def test_nan_message_hints_at_an_empty_validation_set():
    _, decision = step(EarlyStopping(), StopperState(), NAN, 0)
    assert "no validation rows were seen" in decision.message
    _, decision = step(EarlyStopping(), StopperState(), INF, 0)
    assert "no validation rows" not in decision.message


def test_config_and_state_pickle_for_ray_workers():
    config = EarlyStopping(listen="valid/accuracy", patience=3)
    state, _ = step(config, StopperState(), 0.5, 10)
    assert pickle.loads(pickle.dumps(config)) == config
    assert pickle.loads(pickle.dumps(state)) == state
