"""Math answer extraction and equivalence, reproducing lm-evaluation-harness.

Two families, as in the harness:

* Minerva (``lm_eval/tasks/minerva_math/utils.py``): ``get_unnormalized_answer`` +
  ``normalize_final_answer`` and a sympy ``is_equiv`` on parsed LaTeX.
* Hendrycks MATH string normalization (``lm_eval/tasks/aime/utils.py``):
  ``strip_string`` and string ``hendrycks_is_equiv``, used by aime24/aime25.

The harness's quirks are kept on purpose (so scores stay comparable): e.g. minerva
``is_equiv`` is purely symbolic, so two identical strings that sympy cannot parse
are *not* equivalent.
"""

from __future__ import annotations

import re
import signal
import threading
from typing import Callable, Optional, TypeVar

INVALID_ANSWER = "[invalidanswer]"
SYMPY_TIMEOUT_S = 5.0

T = TypeVar("T")


def last_boxed_only_string(string: str) -> Optional[str]:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None."""
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
    return None


def remove_boxed(s: str) -> str:
    """Strip the ``\\boxed{`` ... ``}`` wrapper; AssertionError if ``s`` is not boxed."""
    if "\\boxed " in s:
        left = "\\boxed "
        assert s[: len(left)] == left
        return s[len(left) :]
    left = "\\boxed{"
    assert s[: len(left)] == left
    assert s[-1] == "}"
    return s[len(left) : -1]


# ----------------------------------------------------------------------------- minerva

def get_unnormalized_answer(text: str) -> str:
    """Text between 'Final Answer: The final answer is' and '. I hope it is correct.'"""
    text += "I hope it is correct."
    match = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text)
    return match.group(1).strip() if match else INVALID_ANSWER


SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km",
    "units", "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents",
    "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ",
    r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]


def normalize_final_answer(final_answer: str) -> str:
    """Minerva normalization (Lewkowycz et al. 2022, appendix D), as in the harness."""
    final_answer = final_answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        final_answer = final_answer.replace(expr, "")

    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)

    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")

    if final_answer.replace(",", "").isdigit():
        final_answer = final_answer.replace(",", "")
    return final_answer


def _call_with_timeout(fn: Callable[[], T], seconds: float) -> T:
    """Run ``fn`` and raise TimeoutError after ``seconds``.

    The harness uses SIGALRM, which only works in the main thread; elsewhere we wait
    on a daemon thread instead (a runaway simplify then keeps burning that thread).
    """
    if threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise TimeoutError("sympy timed out")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError("sympy timed out")
    if "error" in box:
        raise box["error"]
    return box["value"]


def is_equiv(x1: str, x2: str, timeout_s: float = SYMPY_TIMEOUT_S) -> bool:
    """Minerva equivalence of two normalized LaTeX strings: ``simplify(x1 - x2) == 0``.

    Any parse/simplify failure or timeout counts as not equivalent, as in the harness.
    """
    import sympy
    from sympy.parsing.latex import parse_latex

    def compare() -> bool:
        diff = parse_latex(x1) - parse_latex(x2)
        return sympy.simplify(diff) == 0

    try:
        return bool(_call_with_timeout(compare, timeout_s))
    except ImportError:
        raise  # missing antlr4-python3-runtime==4.11: a setup error, not a wrong answer
    except Exception:
        return False


def minerva_reference(solution: str) -> str:
    """The normalized target the harness derives from a MATH solution (process_docs)."""
    return normalize_final_answer(remove_boxed(last_boxed_only_string(solution)))


def minerva_extract(generation: str) -> str:
    return normalize_final_answer(get_unnormalized_answer(generation))


# ---------------------------------------------------------------- hendrycks / aime

def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    # int() raising ValueError is deliberately not caught: in the harness it escapes
    # to is_equiv, which then falls back to comparing the raw strings.
    a_int, b_int = int(a), int(b)
    if string != f"{a_int}/{b_int}":
        return string
    return "\\frac{" + str(a_int) + "}{" + str(b_int) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """Hendrycks MATH answer normalization (may raise; callers fall back to ==)."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def hendrycks_is_equiv(str1: Optional[str], str2: Optional[str]) -> bool:
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:
        return str1 == str2


def aime_extract(response: str) -> str:
    """Answer the harness's aime ``process_results`` compares: last ``\\boxed{}``
    content, else the span between the first and last ``$``, else the whole text."""
    dollars = [pos for pos, char in enumerate(response) if char == "$"]
    answer = response if len(dollars) <= 1 else response[dollars[0] + 1 : dollars[-1]]
    boxed = last_boxed_only_string(response)
    if boxed is not None:
        try:
            answer = remove_boxed(boxed)
        except (AssertionError, IndexError):
            pass
    return answer
