"""aime24 / aime25: lm_eval/tasks/aime/aime24.yaml, aime25.yaml + utils.py (zero-shot)."""

from __future__ import annotations

from typing import Optional

from ..math_equiv import aime_extract, hendrycks_is_equiv
from .base import HubDataset, Problem, Task, field_ci


def _make_problems(prefix: str):
    def make(records: list[dict]) -> list[Problem]:
        return [
            Problem(
                id=f"{prefix}/{r.get('ID', r.get('id', i))}",
                user=f"Question: {field_ci(r, 'problem')}\nAnswer:",
                reference=str(field_ci(r, "answer")),
            )
            for i, r in enumerate(records)
        ]
    return make


def _extract(generation: str, problem: Optional[Problem] = None) -> str:
    return aime_extract(generation)


def _aime(name: str, hub: HubDataset) -> Task:
    return Task(
        name=name,
        data_files=(f"{name}.jsonl",),
        data_fields="problem, answer (any capitalization)",
        hub=hub,
        make_problems=_make_problems(name),
        filters={"none": _extract},
        check=lambda answer, problem: hendrycks_is_equiv(answer, problem.reference),
        max_new_tokens=32768,
        stop_sequences=("Question:", "</s>", "<|im_end|>", "<|eot_id|>"),
        num_fewshot=0,
        generation_kwargs={"do_sample": False, "temperature": 0.0},
        apply_chat_template=True,
    )


AIME24 = _aime("aime24", HubDataset("Maxwell-Jia/AIME_2024", None, "train"))
AIME25 = _aime("aime25", HubDataset("math-ai/aime25", None, "test"))
