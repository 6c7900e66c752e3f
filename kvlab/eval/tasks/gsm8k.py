"""gsm8k_cot_llama: lm_eval/tasks/gsm8k/gsm8k-cot-llama.yaml (metadata version 4.0)."""

from __future__ import annotations

from typing import Optional

from .base import HubDataset, Problem, Task, exact_match_normalize, fewshot_context, regex_extract

INSTRUCTION = (
    "Given the following problem, reason and give a final answer to the problem.\n"
    "Problem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
)

# fewshot_config.samples, sampler first_n (YAML folded lines joined by single spaces).
FEWSHOT = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The final answer is 6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The final answer is 5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The final answer is 39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The final answer is 8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The final answer is 9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The final answer is 29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The final answer is 33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The final answer is 8"),
)

STRICT_PATTERN = r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
# metric_list: exact_match, ignore_case, regexes_to_ignore
REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")


def normalize(text: str) -> str:
    return exact_match_normalize(text, REGEXES_TO_IGNORE, ignore_case=True)


def _make_problems(records: list[dict]) -> list[Problem]:
    context = fewshot_context([(INSTRUCTION.format(question=q), t) for q, t in FEWSHOT], target_delimiter="")
    return [
        Problem(
            id=f"gsm8k/{i}",
            user=context + INSTRUCTION.format(question=r["question"]),
            reference=r["answer"].split("####")[-1].strip(),
            metadata={"question": r["question"]},
        )
        for i, r in enumerate(records)
    ]


def _strict(generation: str, problem: Optional[Problem] = None) -> str:
    return normalize(regex_extract(generation, STRICT_PATTERN, group_select=-1))


def _flexible(generation: str, problem: Optional[Problem] = None) -> str:
    return normalize(regex_extract(generation, FLEXIBLE_PATTERN, group_select=-1))


GSM8K_COT_LLAMA = Task(
    name="gsm8k_cot_llama",
    data_files=("gsm8k_test.jsonl",),
    data_fields="question, answer (ending '#### <number>')",
    hub=HubDataset("openai/gsm8k", "main", "test"),
    make_problems=_make_problems,
    filters={"strict-match": _strict, "flexible-extract": _flexible},
    check=lambda answer, problem: answer == normalize(problem.reference),
    max_new_tokens=256,  # no max_gen_toks in the YAML: HFLM's default
    stop_sequences=("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>", "<|im_end|>"),
    num_fewshot=8,
    generation_kwargs={"do_sample": False},
    apply_chat_template=False,
)
