"""humaneval_instruct: lm_eval/tasks/humaneval/humaneval_instruct.yaml (includes humaneval.yaml)."""

from __future__ import annotations

from typing import Optional

from ..sandbox import run_program
from .base import HubDataset, Problem, Task


def _make_problems(records: list[dict]) -> list[Problem]:
    return [
        Problem(
            id=r["task_id"],
            user="Write a solution to the following problem and make sure that it passes the tests:\n"
                 f"```python\n{r['prompt']}\n```\n",
            assistant_prefix=f"Here is the completed function:\n```python\n{r['prompt']}\n",
            reference=r["test"] + "\n" + f"check({r['entry_point']})",
            metadata={"prompt": r["prompt"], "entry_point": r["entry_point"],
                      "canonical_solution": r.get("canonical_solution", "")},
        )
        for r in records
    ]


def build_prediction(generation: str, problem: Optional[Problem]) -> str:
    """utils.build_predictions_instruct: the function prompt + the reply up to the first ```."""
    if problem is None:
        raise ValueError("humaneval extraction needs the problem (its function prompt)")
    cut = generation.find("```")
    return problem.metadata["prompt"] + (generation if cut == -1 else generation[:cut])


def _passes(program: str, problem: Problem) -> bool:
    # HF evaluate code_eval runs candidate + "\n" + reference.
    return run_program(program + "\n" + problem.reference).passed


HUMANEVAL_INSTRUCT = Task(
    name="humaneval_instruct",
    data_files=("humaneval.jsonl",),
    data_fields="task_id, prompt, canonical_solution, test, entry_point",
    hub=HubDataset("openai/openai_humaneval", None, "test"),
    make_problems=_make_problems,
    filters={"create_test": build_prediction},
    check=_passes,
    max_new_tokens=1024,
    stop_sequences=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
    num_fewshot=0,
    generation_kwargs={"do_sample": False},
    apply_chat_template=False,
)
