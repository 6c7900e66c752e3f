"""Generation tasks reproducing lm-evaluation-harness prompts, extraction and scoring."""

from __future__ import annotations

from .aime import AIME24, AIME25
from .base import DATA_DIR_ENV, Problem, Task, TaskDataError
from .gpqa import GPQA_DIAMOND_COT_N_SHOT
from .gsm8k import GSM8K_COT_LLAMA
from .humaneval import HUMANEVAL_INSTRUCT
from .kitty import kitty_settings
from .minerva import MINERVA_MATH_ALGEBRA

TASKS: dict[str, Task] = {
    task.name: task
    for task in (GSM8K_COT_LLAMA, MINERVA_MATH_ALGEBRA, HUMANEVAL_INSTRUCT,
                 GPQA_DIAMOND_COT_N_SHOT, AIME24, AIME25)
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["DATA_DIR_ENV", "Problem", "TASKS", "Task", "TaskDataError", "get_task", "kitty_settings"]
