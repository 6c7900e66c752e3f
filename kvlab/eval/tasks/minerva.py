"""minerva_math_algebra: lm_eval/tasks/minerva_math/minerva_math_algebra.yaml + utils.py."""

from __future__ import annotations

from typing import Optional

from ..math_equiv import is_equiv, minerva_extract, minerva_reference
from .base import HubDataset, Problem, Task, fewshot_context

# utils.list_fewshot_samples (sampler first_n); a few-shot target is the full solution.
FEWSHOT = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)


def doc_to_text(problem: str) -> str:
    return "Problem:" + "\n" + problem + "\n\n" + "Solution:"


def _make_problems(records: list[dict]) -> list[Problem]:
    context = fewshot_context([(doc_to_text(p), s) for p, s in FEWSHOT])
    return [
        Problem(
            id=f"minerva_math_algebra/{i}",
            user=context + doc_to_text(r["problem"]),
            reference=minerva_reference(r["solution"]),
            metadata={k: r[k] for k in ("level", "type") if k in r},
        )
        for i, r in enumerate(records)
    ]


def _extract(generation: str, problem: Optional[Problem] = None) -> str:
    return minerva_extract(generation)


MINERVA_MATH_ALGEBRA = Task(
    name="minerva_math_algebra",
    data_files=("minerva_math_algebra.jsonl",),
    data_fields="problem, solution (MATH algebra test split)",
    hub=HubDataset("EleutherAI/hendrycks_math", "algebra", "test"),
    make_problems=_make_problems,
    filters={"none": _extract},
    check=lambda answer, problem: is_equiv(answer, problem.reference),
    max_new_tokens=256,
    stop_sequences=("Problem:",),
    num_fewshot=4,
    generation_kwargs={"do_sample": False, "temperature": 0},
    apply_chat_template=False,
)
