"""lm-evaluation-harness model ``kvlab``: HFLM with a kvlab compressed cache in the loop.

``generate_until`` generates with a fresh cache per batch. ``loglikelihood`` (and the rolling
variant, which lm-eval builds on it) is scored with the cache in the loop: the context is prefilled
into a fresh cache, then the continuation is fed one token at a time, each token's log-probability
read from the step that attends to the compressed past (HFLM scores context and continuation in one
uncached forward pass, where no compression could act). Requests are scored one at a time.

lm-eval (0.4.x) does not discover third-party models, so run it through this module, which
registers ``kvlab`` before handing the command line to lm-eval::

    python -m kvlab.eval.lm_eval_model --model kvlab \\
        --model_args pretrained=smollm2-135m,method=kitty-pro --tasks gsm8k_cot_llama

``model_args`` separates its arguments with ``,``; write method parameters with ``;`` instead:
``method=kivi-2:group_size=32;residual=32``. Needs ``pip install lm-eval`` (the ``lm-eval`` extra).
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from kvlab.cache import make_cache
from kvlab.eval.fidelity import decode
from kvlab.eval.generation import model_path
from kvlab.methods import parse_method
from kvlab.models import DEFAULT_MODEL, cache_kwargs


@register_model("kvlab")
class KVLabLM(HFLM):
    def __init__(self, pretrained: str = DEFAULT_MODEL, method: str = "fp16", **kwargs) -> None:
        self.kv_method = parse_method(str(method).replace(";", ","))
        if pretrained == DEFAULT_MODEL:
            pretrained = model_path(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        generation_kwargs.update(cache_kwargs(self.model, make_cache(self.kv_method, self.model)))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        results = []
        for request_str, context, continuation in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                       desc=f"loglikelihood ({self.kv_method.label} cache)"):
            tokens = (context + continuation)[-(self.max_length + 1):]  # left-truncate as HFLM
            prompt, cont = tokens[: -len(continuation)], tokens[-len(continuation):]
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            _, lp = decode(self.model, self.kv_method, ids, len(cont), forced=cont)
            target = torch.tensor(cont, device=lp.device)
            answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            results.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
