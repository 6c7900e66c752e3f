"""gpqa_diamond_cot_n_shot: lm_eval/tasks/gpqa/cot_n_shot/_gpqa_cot_n_shot_yaml + utils.py.

Few-shot examples come from the data set itself (the YAML has no fixed samples):
the harness's default sampler draws ``n + 1`` docs with ``random.Random(1234)`` per
evaluated doc, in order, and drops the doc itself. Answer choices are shuffled by
``process_docs`` with the global ``random`` seeded to 0 by ``simple_evaluate``.
"""

from __future__ import annotations

import functools
import random
import re
import sys
import unicodedata
from typing import Mapping, Optional

from .base import (HubDataset, Problem, Task, exact_match_normalize, fewshot_context, regex_extract,
                   REGEX_FALLBACK)

DESCRIPTION = ("Here are some example questions from experts. Answer the final question yourself, "
               "following the format of the previous questions exactly.\n")
CHOICE_SEED = 0  # simple_evaluate's random_seed
FEWSHOT_SEED = 1234  # simple_evaluate's fewshot_random_seed
NUM_FEWSHOT = 5


def preprocess(text: Optional[str]) -> str:
    if text is None:
        return " "
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def doc_to_text(doc: Mapping[str, str]) -> str:
    return (f"Question: {doc['Question']}\nChoices:\n(A) {doc['choice1']}\n(B) {doc['choice2']}\n"
            f"(C) {doc['choice3']}\n(D) {doc['choice4']}\nLet's think step by step: ")


def _process(records: list[dict], rng: random.Random) -> list[dict]:
    docs = []
    for r in records:
        choices = [preprocess(r["Incorrect Answer 1"]), preprocess(r["Incorrect Answer 2"]),
                   preprocess(r["Incorrect Answer 3"]), preprocess(r["Correct Answer"])]
        rng.shuffle(choices)
        correct = choices.index(preprocess(r["Correct Answer"]))
        docs.append({"Question": r["Question"], "choices": choices,
                     **{f"choice{i + 1}": c for i, c in enumerate(choices)},
                     "answer": f"({chr(65 + correct)})"})
    return docs


def _make_problems(records: list[dict]) -> list[Problem]:
    docs = _process(records, random.Random(CHOICE_SEED))
    sampler = random.Random(FEWSHOT_SEED)
    problems = []
    for i, doc in enumerate(docs):
        drawn = sampler.sample(range(len(docs)), NUM_FEWSHOT + 1)
        shots = [docs[j] for j in drawn if j != i][:NUM_FEWSHOT]
        problems.append(Problem(
            id=records[i].get("Record ID") or f"gpqa_diamond/{i}",
            system=DESCRIPTION,
            user=fewshot_context([(doc_to_text(s), s["answer"]) for s in shots]) + doc_to_text(doc),
            reference=doc["answer"],
            metadata={"choices": doc["choices"]},
        ))
    return problems


def normalize(text: str) -> str:
    return exact_match_normalize(text, ignore_case=True, ignore_punctuation=True)


@functools.lru_cache(maxsize=1)
def _unicode_punctuation() -> dict[int, None]:
    return dict.fromkeys(i for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P"))


def _find(pattern: str, text: str, convert: Mapping[str, str]) -> str:
    matches = re.findall(pattern, text)
    if not matches:
        return ""
    match = matches[-1]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    match = match.strip()
    return convert.get(match, match)


def multi_choice_extract(generation: str, choices: list[str]) -> str:
    """lm_eval MultiChoiceRegexFilter (group_select -1, ignore_case, ignore_punctuation)."""
    match = _find(r"(\([A-Z]\))", generation, {})
    if match:
        return match
    squash = lambda s: s.lower().translate(_unicode_punctuation())  # noqa: E731
    letters = [chr(65 + i) for i in range(len(choices))]
    choice_to_letter = {squash(c.strip()): f"({l})" for c, l in zip(choices, letters)}
    by_text = "|".join(re.escape(squash(c.strip())) for c in choices)
    match = _find(by_text, squash(generation), choice_to_letter)
    if match:
        return match
    return _find(f":[\\s]*({'|'.join(letters)})", generation, {l: f"({l})" for l in letters}) or REGEX_FALLBACK


def _strict(generation: str, problem: Optional[Problem] = None) -> str:
    return normalize(regex_extract(generation, r"(?<=The answer is )(.*)(?=.)"))


def _flexible(generation: str, problem: Optional[Problem]) -> str:
    if problem is None:
        raise ValueError("gpqa flexible-extract needs the problem (its choices)")
    return normalize(multi_choice_extract(generation, list(problem.metadata["choices"])))


GPQA_DIAMOND_COT_N_SHOT = Task(
    name="gpqa_diamond_cot_n_shot",
    data_files=("gpqa_diamond.jsonl", "gpqa_diamond.csv"),
    data_fields="Question, Correct Answer, Incorrect Answer 1..3 (GPQA CSV columns)",
    hub=HubDataset("Idavidrein/gpqa", "gpqa_diamond", "train"),
    make_problems=_make_problems,
    filters={"strict-match": _strict, "flexible-extract": _flexible},
    check=lambda answer, problem: answer == normalize(problem.reference),
    max_new_tokens=256,
    stop_sequences=("</s>",),
    num_fewshot=NUM_FEWSHOT,
    generation_kwargs={"do_sample": False, "temperature": 0.0},
    apply_chat_template=False,
)
