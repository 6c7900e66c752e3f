"""Tests for kvlab.eval.tasks / sandbox / math_equiv (imported by full path: the
lead owns kvlab/__init__.py and kvlab/eval/__init__.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jinja2
import pytest

from kvlab.eval import math_equiv
from kvlab.eval.sandbox import run_program
from kvlab.eval.tasks import DATA_DIR_ENV, TASKS, TaskDataError, get_task, kitty_settings

SHARED_DATA = Path(os.environ.get(DATA_DIR_ENV, "/work/shared/data"))
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "gsm8k_test.jsonl").is_file(),
                                  reason="shared data dir not available")


def test_registry_has_the_six_kitty_tasks():
    assert set(TASKS) == {"gsm8k_cot_llama", "minerva_math_algebra", "humaneval_instruct",
                          "gpqa_diamond_cot_n_shot", "aime24", "aime25"}
    with pytest.raises(KeyError, match="known"):
        get_task("mmlu")


# ------------------------------------------------------------------------ gsm8k

@needs_shared
def test_gsm8k_prompt_matches_harness_for_first_test_problem():
    task = TASKS["gsm8k_cot_llama"]
    problem = task.load(SHARED_DATA)[0]
    prompt = task.build_prompt(problem, apply_chat_template=False)

    head = ("Given the following problem, reason and give a final answer to the problem.\n"
            "Problem: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
            "After they are done, there will be 21 trees. How many trees did the grove workers plant today?\n"
            'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
            "There are 15 trees originally. Then there were 21 trees after some more were planted. "
            "So there must have been 21 - 15 = 6. The final answer is 6\n\n")
    last_shot = ("Problem: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n"
                 'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
                 "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
                 "dollars left. 23 - 15 is 8. The final answer is 8\n\n")
    tail = ("Given the following problem, reason and give a final answer to the problem.\n"
            "Problem: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
            "muffins for her friends every day with four. She sells the remainder at the farmers' market daily for "
            "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?\n"
            'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n')
    assert prompt.startswith(head)
    assert prompt.endswith(last_shot + tail)
    assert prompt.count("Given the following problem") == 9  # 8 shots + the question
    assert prompt.count("The final answer is ") == 9 + 8  # 9 instructions + 8 shot targets
    assert problem.reference == "18"
    assert task.num_fewshot == 8 and task.stop_sequences[2] == "Q:"


@pytest.mark.parametrize("generation, strict, flexible", [
    ("She makes 9 * 2 = 18 dollars. The final answer is $1,234.", "1234", "1234"),
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The final answer is 18", "18", "18"),
    ("The final answer is 5. Wait, no. The final answer is -7", "-7", "-7"),
    ("I think it is 42 apples.", "[invalid]", "42"),
    ("No digits at all", "[invalid]", "[invalid]"),
])
def test_gsm8k_extraction(generation, strict, flexible):
    task = TASKS["gsm8k_cot_llama"]
    assert task.extract(generation) == strict
    assert task.extract(generation, filter_name="strict-match") == strict
    assert task.extract(generation, filter_name="flexible-extract") == flexible


def test_gsm8k_scoring():
    task = TASKS["gsm8k_cot_llama"]
    problem = task.make_problems([{"question": "q", "answer": "steps\n#### 1,234"}])[0]
    assert problem.reference == "1,234"
    assert task.score(task.extract("The final answer is $1,234."), problem)
    assert task.score(task.extract("The final answer is 1234"), problem)
    assert not task.score(task.extract("The final answer is 1235"), problem)
    # exact match, not numeric: "1234.00" != "1234" in the harness too
    assert not task.score(task.extract("The final answer is 1234.00"), problem)
    assert not task.score(task.extract("nothing"), problem)


# ---------------------------------------------------------------------- minerva

def test_minerva_prompt_and_reference():
    task = TASKS["minerva_math_algebra"]
    solution = "We get $x = \\boxed{\\dfrac{1}{2}}$."
    problem = task.make_problems([{"problem": "Solve $2x=1$.", "solution": solution}])[0]
    prompt = task.build_prompt(problem)
    assert prompt.startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}\n\n"
                             "Solution: The expressions inside each square root must be non-negative.")
    assert "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.\n\n" in prompt
    assert prompt.endswith("\n\nProblem:\nSolve $2x=1$.\n\nSolution:")
    assert prompt.count("Problem:\n") == 5
    assert problem.reference == "\\dfrac{1}{2}"


@pytest.mark.parametrize("generation, expected", [
    ("x=1/2.\nFinal Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("Final Answer: The final answer is $x = 5$. I hope it is correct.", "5"),
    ("Final Answer: The final answer is $10,000$ dollars. I hope it is correct.", "10000"),
    ("Final Answer: The final answer is $\\frac12$. I hope it is correct.", "\\frac{1}{2}"),
    ("Final Answer: The final answer is $5$.", "[invalidanswer]"),  # harness regex needs '. I hope'
    ("no final answer line", "[invalidanswer]"),
])
def test_minerva_extraction(generation, expected):
    assert TASKS["minerva_math_algebra"].extract(generation) == expected


@pytest.mark.parametrize("a, b, equivalent", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{2}{4}", "\\dfrac{1}{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("3", "4", False),
    ("[2,5)", "[2,5)", False),  # harness quirk: unparseable by sympy => not equivalent
    ("[invalidanswer]", "5", False),
])
def test_minerva_is_equiv(a, b, equivalent):
    assert math_equiv.is_equiv(a, b) is equivalent


def test_minerva_scoring_and_timeout_guard():
    task = TASKS["minerva_math_algebra"]
    problem = task.make_problems([{"problem": "p", "solution": "so $\\boxed{\\frac{3}{4}}$"}])[0]
    assert task.score(task.extract("Final Answer: The final answer is $0.75$. I hope it is correct."), problem)
    assert not task.score(task.extract("Final Answer: The final answer is $3/5$."), problem)
    with pytest.raises(TimeoutError):
        math_equiv._call_with_timeout(lambda: time.sleep(2), 0.2)


# ------------------------------------------------------------------------- aime

@pytest.mark.parametrize("generation, expected", [
    ("... so the answer is \\boxed{204}.", "204"),
    ("Thus $n=\\boxed{33}$", "33"),
    ("\\[\n\\boxed{7}.\n\\]", "7"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("the answer is $x = 5$ done", "x = 5"),
    ("just 12", "just 12"),
])
def test_aime_boxed_extraction(generation, expected):
    assert TASKS["aime24"].extract(generation) == expected


def test_aime_load_and_score(tmp_path):
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"ID": "2024-I-1", "Problem": "P?", "Answer": 204}) + "\n")
    (tmp_path / "aime25.jsonl").write_text(json.dumps({"id": 0, "problem": "Q?", "answer": "70"}) + "\n")
    aime24, aime25 = TASKS["aime24"], TASKS["aime25"]
    (p24,) = aime24.load(tmp_path)
    (p25,) = aime25.load(tmp_path)
    assert (p24.id, p24.user, p24.reference) == ("aime24/2024-I-1", "Question: P?\nAnswer:", "204")
    assert (p25.user, p25.reference) == ("Question: Q?\nAnswer:", "70")
    assert aime24.apply_chat_template and aime24.max_new_tokens == 32768
    assert aime24.score(aime24.extract("so \\boxed{204}"), p24)
    assert aime25.score(aime25.extract("we get $x = 70$"), p25)
    assert not aime25.score(aime25.extract("\\boxed{070}"), p25)  # string compare, as the harness


# ------------------------------------------------------------------------- gpqa

def _gpqa_records(n: int) -> list[dict]:
    return [{"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w{i}a",
             "Incorrect Answer 2": f"w{i}b", "Incorrect Answer 3": f"w{i}c [note]"} for i in range(n)]


def test_gpqa_prompt_structure():
    task = TASKS["gpqa_diamond_cot_n_shot"]
    problems = task.make_problems(_gpqa_records(8))
    assert task.make_problems(_gpqa_records(8)) == problems  # deterministic seeds
    for i, p in enumerate(problems):
        assert p.system.startswith("Here are some example questions from experts.")
        blocks = p.user.split("\n\n")
        assert len(blocks) == 6 and all(b.startswith("Question: ") for b in blocks)
        assert f"Question: Q{i}?" not in "\n\n".join(blocks[:5])  # never its own shot
        assert blocks[-1].startswith(f"Question: Q{i}?\nChoices:\n(A) ") and blocks[-1].endswith("Let's think step by step: ")
        letter = p.reference[1]
        assert f"({letter}) right{i}\n" in blocks[-1]
        assert "[note]" not in p.user and f"w{i}c" in blocks[-1]
    prompt = task.build_prompt(problems[0])
    assert prompt.startswith(problems[0].system + "Question: ")
    assert task.num_fewshot == 5


def test_gpqa_extraction_and_scoring():
    task = TASKS["gpqa_diamond_cot_n_shot"]
    problem = task.make_problems(_gpqa_records(7))[0]
    correct_text = problem.metadata["choices"]["ABCD".index(problem.reference[1])]
    right = problem.reference
    assert task.extract(f"Reasoning. The answer is {right}.", problem) == right[1].lower()
    assert task.extract("no phrase", problem) == "invalid"  # "[invalid]" minus punctuation
    assert task.extract(f"I pick {right} finally", problem, "flexible-extract") == right[1].lower()
    assert task.extract(f"It must be {correct_text.upper()}!", problem, "flexible-extract") == right[1].lower()
    assert task.extract("Final choice: C", problem, "flexible-extract") == "c"
    assert task.score(task.extract(f"The answer is {right}.", problem), problem)
    wrong = "(A)" if right != "(A)" else "(B)"
    assert not task.score(task.extract(f"The answer is {wrong}.", problem), problem)


def test_gpqa_reads_csv(tmp_path):
    import csv
    records = _gpqa_records(6)
    with open(tmp_path / "gpqa_diamond.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    assert len(TASKS["gpqa_diamond_cot_n_shot"].load(tmp_path)) == 6


# -------------------------------------------------------------------- humaneval

@needs_shared
def test_humaneval_prompt_and_canonical_solutions_pass():
    task = TASKS["humaneval_instruct"]
    problems = task.load(SHARED_DATA)
    assert len(problems) == 164
    first = problems[0]
    prompt = task.build_prompt(first, apply_chat_template=False)
    assert prompt == ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      f"```python\n{first.metadata['prompt']}\n```\n"
                      f" Here is the completed function:\n```python\n{first.metadata['prompt']}\n")
    for problem in problems[:3]:
        generation = problem.metadata["canonical_solution"] + "```\n\nThis works because..."
        answer = task.extract(generation, problem)
        assert answer == problem.metadata["prompt"] + problem.metadata["canonical_solution"]
        assert task.score(answer, problem), problem.id
    assert not task.score(task.extract("    return not True\n```", first), first)


@pytest.mark.parametrize("name, source", [
    ("infinite loop", "while True:\n    pass"),
    ("crash", "import os\nos.abort()"),
    ("sys.exit(0) before the checks", "import sys\nsys.exit(0)\nraise AssertionError"),
    ("os._exit(0)", "import os\nos._exit(0)"),
    ("huge allocation", "x = bytearray(8 << 30)"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()"),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])"),
    ("network", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)"),
    ("kill the evaluator", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
    ("write outside the work dir", "open('/tmp/kvlab-sandbox-escape', 'w').write('x')"),
    ("delete files", "import shutil\nshutil.rmtree('/nonexistent-kvlab')"),
])
def test_sandbox_contains_bad_programs(name, source):
    started = time.monotonic()
    result = run_program(source, timeout_s=1.0)
    assert not result.passed, name
    assert time.monotonic() - started < 10
    assert not Path("/tmp/kvlab-sandbox-escape").exists()


def test_sandbox_passes_good_program_and_reports_output():
    result = run_program("import math\nprint(math.factorial(5))\nopen('scratch.txt', 'w').write('ok')")
    assert result.passed and result.status == "passed" and "120" in result.output
    timeout = run_program("while True: pass", timeout_s=0.5)
    assert timeout.status == "timeout" and timeout.returncode is None


# ------------------------------------------------------------- prompts and data

class FakeTokenizer:
    def __init__(self, system_role: bool = True):
        self.system_role = system_role
        self.calls: list[tuple[list[dict], dict]] = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        if not self.system_role and any(m["role"] == "system" for m in messages):
            raise jinja2.TemplateError("System role not supported")
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)


def test_chat_template_messages():
    humaneval = TASKS["humaneval_instruct"]
    problem = humaneval.make_problems([{"task_id": "t", "prompt": "def f():\n", "test": "", "entry_point": "f"}])[0]
    tok = FakeTokenizer()
    humaneval.build_prompt(problem, tok, apply_chat_template=True)
    messages, kwargs = tok.calls[-1]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert kwargs == {"tokenize": False, "add_generation_prompt": False, "continue_final_message": True}

    aime = TASKS["aime24"]
    (p,) = aime.make_problems([{"Problem": "P", "Answer": 1}])
    aime.build_prompt(p, tok)  # chat by default, as Kitty ran aime
    messages, kwargs = tok.calls[-1]
    assert messages == [{"role": "user", "content": "Question: P\nAnswer:"}]
    assert kwargs["add_generation_prompt"] is True

    gpqa = TASKS["gpqa_diamond_cot_n_shot"]
    gp = gpqa.make_problems(_gpqa_records(7))[0]
    no_system = FakeTokenizer(system_role=False)
    text = gpqa.build_prompt(gp, no_system, apply_chat_template=True)
    assert text.startswith("user:Question: ")  # system turn dropped, as HFLM does
    with pytest.raises(ValueError):
        gpqa.build_prompt(gp, None, apply_chat_template=True)


def test_missing_data_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(TaskDataError, match="minerva_math_algebra.jsonl") as err:
        TASKS["minerva_math_algebra"].load(tmp_path)
    assert str(tmp_path) in str(err.value) and "EleutherAI/hendrycks_math" in str(err.value)
    with pytest.raises(TaskDataError, match=DATA_DIR_ENV):
        TASKS["aime25"].load()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(TaskDataError, match="gpqa_diamond.jsonl or gpqa_diamond.csv"):
        TASKS["gpqa_diamond_cot_n_shot"].load()


def test_hub_path_without_datasets_is_a_task_data_error(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets installed: the hub path would try the network")
    except ImportError:
        pass
    with pytest.raises(TaskDataError, match="datasets"):
        TASKS["aime24"].load(tmp_path, allow_hub=True)


def test_kitty_settings():
    humaneval = kitty_settings(TASKS["humaneval_instruct"])
    assert humaneval.max_new_tokens == 4096 and "\n```" in humaneval.stop_sequences
    assert "Problem:" in kitty_settings(TASKS["minerva_math_algebra"]).stop_sequences
    assert "Given the following problem" in kitty_settings(TASKS["aime25"]).stop_sequences
    assert TASKS["humaneval_instruct"].max_new_tokens == 1024  # registry untouched
