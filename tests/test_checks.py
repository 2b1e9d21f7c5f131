"""Parameter checks used by builders and notebooks."""

import pytest

from lcw_analysis.checks import check_choice, check_int, check_list, check_network, check_number


def test_check_choice():
    check_choice("norm", "lcw", ("none", "lcw"))
    expected = r"norm='x' is not known; expected one of \('none', 'lcw'\)"
    with pytest.raises(ValueError, match=expected):
        check_choice("norm", "x", ("none", "lcw"))


@pytest.mark.parametrize("value,low,high,message", [
    (1.5, None, None, "depth must be an integer, got 1.5"),
    (True, None, None, "depth must be an integer"),
    (0, 1, None, "depth must be an integer >= 1, got 0"),
    (9, 1, 8, "depth must be an integer <= 8, got 9"),
])
def test_check_int_errors(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int("depth", value, low, high)


def test_check_int_accepts():
    check_int("depth", 3, 1, 3)


def test_check_number():
    check_number("lr", 0.1, positive=True)
    check_number("shift", -2)
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        check_number("lr", 0, positive=True)
    with pytest.raises(ValueError, match="lr must be a number, got '0.1'"):
        check_number("lr", "0.1")


def test_check_list():
    assert check_list("norms", ("none", "lcw"), allowed=("none", "lcw", "bn")) == ["none", "lcw"]
    with pytest.raises(ValueError, match="norms must be a list, got 'lcw'"):
        check_list("norms", "lcw")
    with pytest.raises(ValueError, match="at least 1"):
        check_list("norms", [])
    with pytest.raises(ValueError, match="norms contains 'ln', which is not known"):
        check_list("norms", ["lcw", "ln"], allowed=("none", "lcw"))


def test_check_network():
    check_network(3, 8, ["sigmoid", "gelu"], ["none", "lcw"])
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        check_network(0, 8, ["sigmoid"], ["none"])
    with pytest.raises(ValueError, match="activations: activation='sigmod' is not known"):
        check_network(3, 8, ["sigmod"], ["none"])
    with pytest.raises(ValueError, match="norms contains 'layer', which is not known"):
        check_network(3, 8, ["relu"], ["layer"])
    with pytest.raises(ValueError, match=r"width must be >= 2 with norms \['lcw\+bn'\]"):
        check_network(3, 1, ["relu"], ["none", "lcw+bn"])
    check_network(3, 1, ["relu"], ["none", "bn"])
