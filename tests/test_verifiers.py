"""Verifiers grade 0/1, agree with the usual MATH normalisation and math-verify equivalence, resolve by
name or import path, and never raise on garbage model output."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_paced.rollout.verifiers import BUILTIN, exact, integer, last_boxed, math_boxed, resolve, score


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, finally \\boxed{4}", "4"),
    ("nested \\boxed{\\frac{a}{\\sqrt{b}}} end", "\\frac{a}{\\sqrt{b}}"),
    ("\\boxed 7.", "7"),
    ("\\fbox{12}", "12"),
    ("\\boxed{3", None),  # cut off mid-answer
    ("no box at all", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("completion, answer", [
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{0.25}", "\\frac{1}{4}"),  # only math-verify sees this one
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{5^\\circ}", "5"),
    ("\\boxed{\\$10}", "10"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
    ("\\boxed{2\\sqrt3}", "2\\sqrt{3}"),
    ("\\boxed{10 \\text{ cm}}", "10"),
    ("\\boxed{.5}", "0.5"),
    ("\\boxed{2x+1}", "1+2x"),
    ("\\boxed{-3}", "-3.0"),
    ("\\boxed{7}", "\\boxed{7}"),  # a reference stored with its box
])
def test_math_boxed_accepts_equivalent_answers(completion, answer):
    assert score(math_boxed, completion, answer) == 1


@pytest.mark.parametrize("completion, answer", [
    ("\\boxed{4}", "5"),
    ("the answer is 4", "4"),  # no box: not accepted, as in the paper's grader
    ("\\boxed{4", "4"),
    ("\\boxed{}", "4"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),
    ("\\boxed{" + "(" * 5000 + "}", "1"),
    ("\\boxed{\x00\xff}", "1"),
])
def test_math_boxed_rejects(completion, answer):
    assert score(math_boxed, completion, answer) == 0


def test_math_boxed_works_off_the_main_thread():
    """math-verify's own timeout needs SIGALRM, which worker threads (the service's) cannot set."""
    results = []
    thread = threading.Thread(target=lambda: results.append(score(math_boxed, "\\boxed{0.25}", "\\frac{1}{4}")))
    thread.start()
    thread.join()
    assert results == [1]


def test_exact_and_integer():
    assert exact(" 7572\n", "7572") and not exact("757", "7572")
    assert integer("so the total is 1,000 apples", "1000")
    assert integer("\\boxed{42}, not 7", "42")
    assert integer("-5", "-5") and not integer("5", "-5")
    assert not integer("no digits", "3") and not integer("3", "three")


def test_resolve_by_name_and_import_path():
    assert resolve("math_boxed") is math_boxed
    verify = resolve("rollout_toys:first_char_in")  # tests/ is on sys.path
    assert score(verify, "7 and more", "789") == 1 and score(verify, "5", "789") == 0
    for name, message in [("nope", "unknown verifier 'nope'"), ("os:nothing", "no callable 'nothing'"),
                          ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'")]:
        with pytest.raises(ValueError, match=message):
            resolve(name)


def test_score_turns_crashes_and_odd_results_into_zero():
    def crashes(completion, answer):
        raise RuntimeError("boom")

    assert score(crashes, "x", "y") == 0
    assert score(lambda c, a: 0.5, "x", "y") == 0
    assert score(lambda c, a: "yes", "x", "y") == 0
    assert score(lambda c, a: [1, 2], "x", "y") == 0
    assert score(lambda c, a: 1.0, "x", "y") == 1


@settings(max_examples=60, deadline=None)
@given(completion=st.text(max_size=200) | st.builds(lambda s: f"\\boxed{{{s}}}", st.text(max_size=60)),
       answer=st.text(max_size=20))
def test_builtins_never_raise_on_garbage(completion, answer):
    for verifier in BUILTIN.values():
        assert verifier(completion, answer) in (True, False)  # directly, not through score's safety net
