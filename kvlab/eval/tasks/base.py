"""Task / Problem abstractions mirroring how lm-evaluation-harness builds prompts.

A ``Problem`` keeps the prompt in the pieces the harness assembles (with
``fewshot_as_multiturn=False``): the task ``description`` (a system message under a
chat template), one user turn holding the few-shot context followed by the question,
and an optional ``gen_prefix`` that starts the assistant's reply.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

DATA_DIR_ENV = "KVLAB_DATA_DIR"
TARGET_DELIMITER = " "  # harness defaults
FEWSHOT_DELIMITER = "\n\n"
REGEX_FALLBACK = "[invalid]"


class TaskDataError(RuntimeError):
    """A task's data set is not where it is expected (message says what to put where)."""


@dataclass(frozen=True)
class Problem:
    id: str
    user: str
    reference: str
    system: str = ""
    assistant_prefix: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        turns.append({"role": "user", "content": self.user})
        if self.assistant_prefix:
            turns.append({"role": "assistant", "content": self.assistant_prefix})
        return turns


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: Optional[str]
    split: str


Filter = Callable[[str, Optional[Problem]], str]


@dataclass(frozen=True)
class Task:
    """One generation task. ``filters`` maps the harness filter names (e.g.
    ``strict-match``) to extractors; the first one is the primary metric."""

    name: str
    data_files: tuple[str, ...]
    data_fields: str
    hub: HubDataset
    make_problems: Callable[[list[dict]], list[Problem]]
    filters: Mapping[str, Filter]
    check: Callable[[str, Problem], bool]
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    num_fewshot: int
    generation_kwargs: Mapping[str, Any]
    apply_chat_template: bool  # what Kitty's runs used for this task

    @property
    def filter_names(self) -> tuple[str, ...]:
        return tuple(self.filters)

    def load(self, data_dir: str | os.PathLike | None = None, allow_hub: bool = False) -> list[Problem]:
        return self.make_problems(self._records(data_dir, allow_hub))

    def build_prompt(self, problem: Problem, tokenizer: Any = None,
                     apply_chat_template: Optional[bool] = None) -> str:
        """The exact text fed to the model; ``apply_chat_template=None`` uses the task default."""
        use_chat = self.apply_chat_template if apply_chat_template is None else apply_chat_template
        if not use_chat:
            prefix = TARGET_DELIMITER + problem.assistant_prefix if problem.assistant_prefix else ""
            return problem.system + problem.user + prefix
        if tokenizer is None:
            raise ValueError("apply_chat_template=True needs a tokenizer")
        return render_chat(tokenizer, problem.messages())

    def extract(self, generation: str, problem: Optional[Problem] = None,
                filter_name: Optional[str] = None) -> str:
        name = filter_name or self.filter_names[0]
        if name not in self.filters:
            raise KeyError(f"{self.name} has no filter {name!r}; choose from {self.filter_names}")
        return self.filters[name](generation, problem)

    def score(self, answer: str, problem: Problem) -> bool:
        return bool(self.check(answer, problem))

    def _records(self, data_dir: str | os.PathLike | None, allow_hub: bool) -> list[dict]:
        directory = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
        if directory is not None:
            for file_name in self.data_files:
                path = Path(directory) / file_name
                if path.is_file():
                    return read_records(path)
        if allow_hub:
            return self._hub_records()
        where = f"in {directory}" if directory is not None else f"in a directory given by --data-dir or ${DATA_DIR_ENV}"
        raise TaskDataError(
            f"{self.name}: data not found. Put {' or '.join(self.data_files)} {where} "
            f"(records with fields {self.data_fields}; source: HF dataset "
            f"{self.hub.path}{' config ' + self.hub.name if self.hub.name else ''}, split {self.hub.split}), "
            "or allow the hub download (needs the `datasets` package and network access)."
        )

    def _hub_records(self) -> list[dict]:
        try:
            import datasets
        except ImportError as exc:
            raise TaskDataError(f"{self.name}: hub download needs the `datasets` package") from exc
        try:
            dataset = datasets.load_dataset(self.hub.path, self.hub.name, split=self.hub.split)
        except Exception as exc:
            raise TaskDataError(
                f"{self.name}: could not load {self.hub.path} ({self.hub.name}) from the hub: {exc}. "
                f"Place {self.data_files[0]} in a data dir instead."
            ) from exc
        return [dict(row) for row in dataset]


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def field_ci(record: Mapping[str, Any], key: str) -> Any:
    """Case-insensitive field lookup (AIME sets spell 'Problem' or 'problem')."""
    for name, value in record.items():
        if name.lower() == key.lower():
            return value
    raise KeyError(key)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """HFLM.apply_chat_template: continue a trailing assistant turn (gen_prefix), else
    add the generation prompt; templates without a system role drop the system turn."""
    import jinja2

    continue_final = messages[-1]["role"] == "assistant"
    kwargs = dict(tokenize=False, add_generation_prompt=not continue_final,
                  continue_final_message=continue_final)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError:
        return tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], **kwargs)


def fewshot_context(shots: Sequence[tuple[str, str]], target_delimiter: str = TARGET_DELIMITER) -> str:
    """ContextSampler.get_context: text+delimiter+target per shot, each followed by a blank line."""
    return "".join(text + target_delimiter + target + FEWSHOT_DELIMITER for text, target in shots)


def regex_extract(text: str, pattern: str | re.Pattern, group_select: int = 0,
                  fallback: str = REGEX_FALLBACK) -> str:
    """lm_eval RegexFilter: the ``group_select``-th findall match, first non-empty group."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def exact_match_normalize(text: str, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                          ignore_punctuation: bool = False) -> str:
    """The per-string transform of lm_eval's exact_match (HF evaluate semantics)."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text
