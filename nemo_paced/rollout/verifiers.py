"""Verifiers: grade one completion against a reference answer, 1 for correct and 0 otherwise.

A verifier is any callable `(completion: str, answer: str) -> bool | int | float`. `resolve` turns
a name into one: a built-in (`math_boxed`, `exact`, `integer`) or an import path `module:function`,
so a recipe can bring its own. Model output is untrusted text, so `score` never raises: a verifier
that crashes, or returns something that is not a 0/1 value, scores the sample 0.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from typing import Callable

Verifier = Callable[[str, str], object]

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer boxed answers are not sent to the symbolic checker (sympy can stall)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces balanced; None if absent."""
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    start, command = (boxed, "\\boxed") if boxed >= fbox else (fbox, "\\fbox")
    if start < 0:
        return None
    rest = text[start + len(command):]
    if rest.startswith(" "):  # `\boxed 5`: the argument is the next word
        word = rest.strip().split(maxsplit=1)
        return word[0].rstrip("$.") if word else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the answer was cut off


def normalize_math(answer: str) -> str:
    """String normalisation in the spirit of the Hendrycks MATH grader: spacing, fraction spelling,
    `\\left`/`\\right`, degrees, dollars, percent, units in `\\text{}`, leading zeros of decimals,
    a `x =` prefix, `\\sqrt3` and `\\frac12` shorthands, `a/b` for integers, and 0.5 as 1/2."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s.rstrip()) if re.search(r"\d", s) else s
    s = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    if "=" in s and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=", 1)[1]
    s = s.replace(" ", "")
    s = re.sub(r"(^|[{(,])\.(\d)", r"\g<1>0.\2", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if match:
        s = f"\\frac{{{match[1]}}}{{{match[2]}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    return s


def math_boxed(completion: str, answer: str) -> bool:
    """The paper's verifier: the last boxed answer, normalised, equal to the reference; if the strings
    differ, mathematical equivalence through `math-verify` (e.g. 0.25 and \\frac{1}{4})."""
    predicted = last_boxed(completion)
    if predicted is None:
        return False
    reference = last_boxed(answer) or answer
    if normalize_math(predicted) == normalize_math(reference):
        return True
    if len(predicted) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set; the service grades in
    # worker threads, where the length bound above stands in for the timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    target = parse(f"${predicted}$", parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


def exact(completion: str, answer: str) -> bool:
    """The whole completion equals the answer, ignoring surrounding whitespace."""
    return completion.strip() == answer.strip()


_INTEGER = re.compile(r"-?\d[\d,]*")


def integer(completion: str, answer: str) -> bool:
    """The last integer in the completion (the boxed one if there is a box; `1,000` reads as 1000)
    equals the integer answer (AIME style)."""
    text = last_boxed(completion) or completion
    found = _INTEGER.findall(text)
    expected = _INTEGER.fullmatch(answer.strip())
    if not found or expected is None:
        return False
    return int(found[-1].replace(",", "")) == int(expected[0].replace(",", ""))


BUILTIN: dict[str, Verifier] = {"math_boxed": math_boxed, "exact": exact, "integer": integer}


def resolve(name: str) -> Verifier:
    """A built-in verifier by name, or any callable by import path `package.module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"unknown verifier {name!r}: use one of {', '.join(BUILTIN)} or an import path "
                         "'package.module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {name!r}: cannot import module {module_name!r}: {e}") from e
    for part in attribute.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"verifier {name!r}: module {module_name!r} has no callable {attribute!r}")
    return target


def score(verifier: Verifier, completion: str, answer: str) -> int:
    """1 if the verifier accepts the completion, else 0; never raises on bad model output."""
    try:
        result = verifier(completion, answer)
        return int(result) if isinstance(result, bool) or result in (0, 1) else 0
    except Exception as e:  # noqa: BLE001 - garbage output must score 0, not stop a job
        log.debug("verifier %r raised on a completion: %r", getattr(verifier, "__name__", verifier), e)
        return 0
