"""Joined projections (kvlab.projections): one product per group of projections, the same outputs, no extra bytes,
and the model's parameters given back in their own storage."""

import pytest
import torch

from kvlab.generate import decoder_layers
from kvlab.models import load_model
from kvlab.projections import JoinedProjections


@pytest.fixture
def tiny():
    model, _ = load_model("random:tiny-llama")
    return model


def _storages(model) -> dict[int, int]:
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def test_joined_projections_compute_the_same_logits_in_the_same_bytes(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    with torch.no_grad():
        ref = tiny(ids).logits
    held = sum(_storages(tiny).values())
    joined = JoinedProjections(decoder_layers(tiny))
    assert len(joined.groups) == 2 * tiny.config.num_hidden_layers  # q/k/v and gate/up of every layer
    attn = tiny.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert sum(_storages(tiny).values()) == held
    with torch.no_grad(), joined.swapped():
        assert type(attn.k_proj).__name__ == "JoinedPart"
        out = tiny(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert type(attn.k_proj) is torch.nn.Linear  # the modules are back outside ``swapped``
    joined.restore()
    joined.restore()  # idempotent
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.v_proj.weight.untyped_storage().data_ptr()
    assert sum(_storages(tiny).values()) == held
    for n, p in tiny.named_parameters():
        assert torch.equal(p, before[n]) and not p.is_inference() and p.requires_grad, n


def test_a_part_called_on_another_input_or_out_of_order_computes_its_own_columns(tiny):
    attn = tiny.model.layers[0].self_attn
    x, y = torch.randn(3, tiny.config.hidden_size), torch.randn(3, tiny.config.hidden_size)
    with torch.no_grad():
        q, k_y, k, v = attn.q_proj(x), attn.k_proj(y), attn.k_proj(x), attn.v_proj(x)
        joined = JoinedProjections([tiny.model.layers[0]])
        with joined.swapped():
            got = attn.q_proj(x), attn.k_proj(y), attn.v_proj(x)  # k on another input
            assert attn.q_proj.joint.input is None  # the last part drops the held product
            got_reversed = attn.v_proj(x), attn.k_proj(x), attn.q_proj(x)
        joined.restore()
    torch.testing.assert_close(got, (q, k_y, v))
    torch.testing.assert_close(got_reversed, (v, k, q))


def test_a_compiled_layer_reads_each_group_in_one_product(tiny):
    """What the compiled decode step gets: dynamo's graph of a decoder layer holds 4 linear products (q/k/v, o,
    gate/up, down) instead of 7."""
    layer = tiny.model.layers[0]
    hidden = torch.randn(2, 1, tiny.config.hidden_size)
    position = torch.zeros(2, 1, dtype=torch.long)
    embeddings = tiny.model.rotary_emb(hidden, position)

    def linears_in_graph() -> int:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(layer.forward, backend=backend, fullgraph=True)(
                hidden, attention_mask=None, position_embeddings=embeddings)
        assert len(graphs) == 1
        return out, sum(node.target is torch._C._nn.linear for node in graphs[0].graph.nodes)

    ref, apart = linears_in_graph()
    joined = JoinedProjections([layer])
    with joined.swapped():
        out, together = linears_in_graph()
    joined.restore()
    assert (apart, together) == (7, 4)
    torch.testing.assert_close(out, ref)


def test_only_plain_linear_groups_are_joined(tiny):
    mlp = tiny.model.layers[0].mlp
    mlp.up_proj = torch.nn.Linear(tiny.config.hidden_size, tiny.config.intermediate_size, bias=True)  # bias unlike gate
    joined = JoinedProjections([tiny.model.layers[0]])
    assert [[name for _, name, _ in places] for places, _ in joined.groups] == [["q_proj", "k_proj", "v_proj"]]
    joined.restore()
