"""The generation settings Kitty's accuracy runs override (src/kitty_sim/eval/runner.py,
eval_helper.py in Summer-Summer/Kitty): every task gets max_new_tokens=4096 and its
``until`` replaced by the model's end tokens plus one task-specific stop string."""

from __future__ import annotations

import dataclasses

from .base import Task

KITTY_MAX_NEW_TOKENS = 4096
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|end_header_id|>", "<|endoftext|>", "<|im_end|>")
TASK_STOPS = {
    "gsm8k": "Given the following problem",
    "math": "Problem:",
    "gpqa": "Question:",
    "humaneval": "\n```",
    "aime": "Given the following problem",
}


def kitty_settings(task: Task) -> Task:
    """``task`` with Kitty's max_new_tokens and stop strings (the first matching key wins,
    as in Kitty's loop over its dict)."""
    extra = next((stop for key, stop in TASK_STOPS.items() if key in task.name), None)
    stops = END_TOKENS + ((extra,) if extra else ())
    return dataclasses.replace(task, max_new_tokens=KITTY_MAX_NEW_TOKENS, stop_sequences=stops)
