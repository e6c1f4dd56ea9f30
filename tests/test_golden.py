"""The shipped weight files answer every operation as they did when their golden values were written.

tests/golden/shipped.json holds, per weight file in weights/ and per operation it serves, hashes of
the answers to fixed, seeded requests (tests/golden/__init__.py says which). One app is started on
weights/ for the module (about 5 s on 2 cores); each (file, operation) is a test of its own, so a
failure names the model and the operation, and its message each case that changed. After a
deliberate change of behaviour or of a shipped file: `python -m tests.golden --write`, and review the diff.
"""

from __future__ import annotations

import copy

import pytest

from tests import golden

EXPECTED = golden.load()
CASES = [(file, op) for file, model in EXPECTED["models"].items() for op in model["operations"]]


@pytest.fixture(scope="module")
def actual() -> dict:
    return golden.compute(golden.WEIGHTS)


def test_every_shipped_file_is_served_and_has_golden_values(actual):
    shipped = sorted(p.name for p in golden.WEIGHTS.glob("*.safetensors"))
    assert sorted(actual["models"]) == shipped, "every shipped weight file is served (GET /models lists it)"
    missing = [f for f in shipped if f not in EXPECTED["models"]]
    assert not missing, f"shipped weight files without golden values: {missing}; run `{golden.REGENERATE}`"


@pytest.mark.parametrize(("file", "operation"), CASES, ids=[f"{f.removesuffix('.safetensors')}:{op}" for f, op in CASES])
def test_shipped_model_answers_as_recorded(actual, file, operation):
    differences = golden.compare(EXPECTED, actual, file, operation)
    if differences:
        name = EXPECTED["models"][file]["name"]
        head = f"{name} ({file}): {operation} answers otherwise than tests/golden/shipped.json records:"
        pytest.fail("\n".join([head, *differences,
                               f"after a deliberate change: `{golden.REGENERATE}`, and review the diff"]), pytrace=False)


# The comparison itself, on records made here: what each kind of change is reported as.

def record(items=("aa", "bb"), signatures=((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), machine="here", sha="1" * 64, **case):
    case = {"shape": [2, 8, 8], "dtype": "uint8", "items": list(items), "signatures": [list(s) for s in signatures], **case}
    return {"machine": {"cpu": machine}, "models": {
        "vq.safetensors": {"name": "vq", "sha256": sha, "operations": {"decode": {"4 codes": case}}},
        "prior.safetensors": {"name": "prior", "sha256": "2" * 64, "depends_on": ["vq.safetensors"],
                              "operations": {"sample": {"n=2": copy.deepcopy(case)}}},
    }}


def test_an_unchanged_answer_passes():
    assert golden.compare(record(), record(), "vq.safetensors", "decode") == []


def test_a_changed_item_is_named_with_the_model_the_operation_and_the_case():
    (line,) = golden.compare(record(), record(items=("aa", "cc"), signatures=((1, 2, 3), (4, 9, 6))),
                             "vq.safetensors", "decode")
    assert line.startswith("vq (vq.safetensors) decode [4 codes]: items [1] of 2 differ")
    assert "beyond rounding" in line


def test_a_change_in_the_last_bits_fails_on_the_recording_machine_and_says_so():
    (line,) = golden.compare(record(), record(items=("aa", "cc"), signatures=((1, 2, 3), (4, 5.01, 6))),
                             "vq.safetensors", "decode")
    assert "items [1] of 2 differ" in line and "at the level of rounding" in line


def test_on_another_machine_only_the_signatures_are_compared():
    rounding = record(items=("xx", "yy"), signatures=((1, 2, 3), (4, 5.01, 6)), machine="elsewhere")
    assert golden.compare(record(), rounding, "vq.safetensors", "decode") == []
    changed = record(items=("xx", "yy"), signatures=((1, 2, 3), (4, 7, 6)), machine="elsewhere")
    lines = golden.compare(record(), changed, "vq.safetensors", "decode")
    assert "items [1] of 2 differ" in lines[0] and "signatures only" in lines[-1]


def test_a_replaced_weight_file_is_reported_as_such_for_its_priors_too():
    replaced = record(items=("xx", "yy"), sha="3" * 64)
    for file, operation in [("vq.safetensors", "decode"), ("prior.safetensors", "sample")]:
        (line,) = golden.compare(record(), replaced, file, operation)
        assert line.startswith("weight file vq.safetensors changed (sha256 111111111111 -> 333333333333)")
        assert golden.REGENERATE in line


def test_changed_inputs_are_not_reported_as_a_change_of_behaviour():
    (line,) = golden.compare(record(inputs="0" * 16), record(inputs="f" * 16, items=("xx", "yy")),
                             "vq.safetensors", "decode")
    assert "the test's inputs changed" in line
