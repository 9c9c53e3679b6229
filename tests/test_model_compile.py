"""torch.compile(fullgraph=True) of injected models: no graph break, matches eager, never stale."""

from __future__ import annotations

import pytest
import torch
from model_helpers import LLAMA_TARGETS, inject, llama_ids, tiny_llama
from torch import nn

import lora_ext

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _mlp_with_two_adapters():
    torch.manual_seed(0)
    model = _MLP().eval()
    cfg = dict(target_modules=["emb", "fc1", "fc2"], init_lora_weights=False)
    torch.manual_seed(1)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=4, lora_alpha=8, **cfg), "a")
    torch.manual_seed(2)
    lora_ext.inject_adapter(model, lora_ext.LoraConfig(r=2, lora_alpha=4, **cfg), "b")
    return model


def _eager(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_matches_eager_forward_and_backward():
    model = _mlp_with_two_adapters()
    model.train()  # exercises dropout=0 training path and autograd through the custom op
    ids = torch.randint(0, 50, (4, 6))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(ids)
    y_ref = model(ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    y_ref.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-5, atol=1e-6)


def test_no_graph_break_on_tiny_llama():
    model = tiny_llama()
    inject(model, target_modules=[*LLAMA_TARGETS, "embed_tokens", "lm_head"])
    ids = llama_ids()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_switching_adapter_and_merging_is_never_stale():
    model = _mlp_with_two_adapters()
    ids = torch.randint(0, 50, (4, 6))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def check(label):
        with torch.no_grad():
            got = compiled(ids)
        torch.testing.assert_close(got, _eager(model, ids), rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")
        return got

    out_a = check("adapter a")
    lora_ext.set_adapter(compiled, "b")  # the compile wrapper is looked through
    out_b = check("adapter b")
    assert not torch.allclose(out_a, out_b)
    lora_ext.set_adapter(model, ["a", "b"])
    check("a + b")
    lora_ext.set_adapter(model, "a")
    lora_ext.merge_adapter(model)
    torch.testing.assert_close(check("merged a"), out_a, rtol=1e-5, atol=1e-5)
    # weights changed in place while the graph is cached: merged + unmerged must not double count
    lora_ext.unmerge_adapter(model)
    torch.testing.assert_close(check("unmerged a"), out_a, rtol=1e-5, atol=1e-5)
    with lora_ext.disable_adapters(model):
        check("disabled")
    with torch.no_grad():  # a factor update after compilation is seen (parameters are graph inputs)
        model.fc1.lora_B["a"].weight.mul_(3)
    check("updated factor")
    lora_ext.delete_adapter(model, "b")
    check("b deleted")


def test_default_inductor_backend_matches_eager():
    """The default backend (inductor: generated C++ on CPU) with fullgraph=True."""
    model = _mlp_with_two_adapters()
    ids = torch.randint(0, 50, (4, 6))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
        lora_ext.set_adapter(model, "b")
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
