"""The ``$`` expressions of a MONAI configuration read as plain data: what is computed, and what is refused
without being run."""

from __future__ import annotations

import pytest

from MedSegUNetLib.importers.config_expressions import NotPlainData, evaluate

ENTRIES = {"highres": True, "sizes": [96, 96, 96], "root": ".", "name": "model.pt", "zero": 0}


def lookup(path: str):
    return ENTRIES[path]


@pytest.mark.parametrize(
    "text, value",
    [
        ("[1.5, 1.5, 1.5] if @highres else [3.0, 3.0, 3.0]", [1.5, 1.5, 1.5]),
        ("'a.pt' if not @highres else 'b.pt'", "b.pt"),
        ("@root + '/models/' + @name", "./models/model.pt"),
        ("@sizes + [1]", [96, 96, 96, 1]),
        ("-0.5", -0.5),
        ("2e3", 2000.0),
        ("@zero == 0 and @highres", True),
        ("@zero or 'fallback'", "fallback"),
        ("(1, 2)", [1, 2]),
        ("None", None),
    ],
)
def test_plain_data_is_computed(text, value):
    assert evaluate(text, lookup) == value


def test_only_the_chosen_branch_is_looked_up():
    looked_up = []

    def recording(path: str):
        looked_up.append(path)
        return ENTRIES[path]

    assert evaluate("@sizes if @highres else @missing", recording) == [96, 96, 96]
    assert looked_up == ["highres", "sizes"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("__import__('os').system('true')", "a call"),
        ("torch.device('cpu')", "a call"),
        ("numpy.float32", "an attribute"),
        ("@sizes[0]", "a subscript"),
        ("[8] * 4", "a BinOp"),
        ("os", "the name 'os'"),
        ("[i for i in @sizes]", "a ListComp"),
        ("lambda: 0", "a Lambda"),
        ("'a' + 1", "adds str and int"),
        ("@name < 1", "compares str with int"),
        ("-'a'", "a UnaryOp"),
        ("1 +", "not an expression"),
        ("import os", "not an expression"),
    ],
)
def test_anything_else_is_refused_without_running(text, reason):
    with pytest.raises(NotPlainData, match=reason):
        evaluate(text, lookup)
