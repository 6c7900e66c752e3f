"""One matmul for the projections of a decoder layer that read the same input, in kvlab's decode steps.

At decode batch sizes a projection is a matrix-vector product: it costs its weight's bytes plus a fixed few
microseconds (launch, ramp-up, cuBLAS's split-K reduction). Llama-3.1-8B shapes on an H200, batch 1
(``benchmarks/step_profile.py --matmuls``): q, k and v projections apart 26.0 us per layer, as one product 15.5;
gate and up 60.0 vs 55.1, i.e. 0.49 ms of a 5.5 ms step.

:class:`JoinedProjections` concatenates the weights of each group in :data:`GROUPS` found in a layer (plain
``nn.Linear`` modules with one input size, dtype and device), and makes the model's own parameters views of the
joined weight, so the model holds no extra bytes and computes what it computed. While :meth:`JoinedProjections.swapped`
is active, each group's modules are replaced by :class:`JoinedPart` modules: the first part computes the whole
product, the others return their columns of it when they are called with the same input tensor (transformers'
Llama, Qwen, Mistral layers call ``q, k, v`` and ``gate, up`` in that order on one tensor), else their own product.
:meth:`JoinedProjections.restore` gives each parameter its own storage again: ``save_pretrained`` refuses
parameters that share storage without being tied.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Joint:
    """One group's concatenated weight and bias, and the product of the input its first part was called with."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.weight = torch.cat([m.weight for m in linears])
        self.bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        self.bounds = [0]
        for m in linears:
            self.bounds.append(self.bounds[-1] + m.out_features)
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class JoinedPart(torch.nn.Module):
    """Stands in for projection ``index`` of a joined group: its columns of the group's product."""

    def __init__(self, joint: _Joint, index: int):
        super().__init__()
        self.joint, self.index = joint, index
        self.start, self.stop = joint.bounds[index], joint.bounds[index + 1]
        self.last = index == len(joint.bounds) - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        j = self.joint
        if self.index == 0:
            j.input, j.output = x, F.linear(x, j.weight, j.bias)
        if j.input is x:
            out = j.output[..., self.start : self.stop]
        else:  # called on another input (or out of order): its own product
            bias = None if j.bias is None else j.bias[self.start : self.stop]
            out = F.linear(x, j.weight[self.start : self.stop], bias)
        if self.last:
            j.input = j.output = None
        return out


def _joinable(linears: list) -> bool:
    first = linears[0]
    return all(type(m) is torch.nn.Linear and m.weight.device.type != "meta"  # meta: offloaded by accelerate
               and m.in_features == first.in_features
               and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
               and (m.bias is None) == (first.bias is None) for m in linears)


class JoinedProjections:
    """The joined groups of ``layers`` (decoder layer modules); see the module docstring."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.groups: list[tuple[list[tuple[torch.nn.Module, str, torch.nn.Linear]], list[JoinedPart]]] = []
        with torch.inference_mode(False), torch.no_grad():  # parameters stay normal tensors
            for layer in layers:
                for parent in layer.modules():
                    for names in GROUPS:
                        linears = [getattr(parent, n, None) for n in names]
                        if not _joinable(linears):
                            continue
                        joint = _Joint(linears)
                        for i, m in enumerate(linears):
                            m.weight.data = joint.weight[joint.bounds[i] : joint.bounds[i + 1]]
                            if m.bias is not None:
                                m.bias.data = joint.bias[joint.bounds[i] : joint.bounds[i + 1]]
                        places = [(parent, n, m) for n, m in zip(names, linears)]
                        self.groups.append((places, [JoinedPart(joint, i) for i in range(len(names))]))

    @contextmanager
    def swapped(self):
        """The joined parts in place of the groups' modules, inside."""
        for places, parts in self.groups:
            for (parent, name, _), part in zip(places, parts):
                setattr(parent, name, part)
        try:
            yield
        finally:
            for places, _ in self.groups:
                for parent, name, module in places:
                    setattr(parent, name, module)

    def restore(self) -> None:
        """Each parameter in its own storage again (idempotent); the joined weights are dropped."""
        with torch.inference_mode(False), torch.no_grad():
            while self.groups:  # a group's joined weight goes as soon as its parameters are copied out
                places, _ = self.groups.pop()
                for _, _, m in places:
                    m.weight.data = m.weight.data.clone()
                    if m.bias is not None:
                        m.bias.data = m.bias.data.clone()
