"""Rank guidance (lora_ext/rank.py): suggest_rank's table, rank_report's singular values against a float64 SVD
of the full s·BA (which rank_report never forms), the effective rank, and an adapter trained on a task whose
true update has rank 2: the report finds 2 and the rank_pattern built from it adapts that layer at r = 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import rank_pattern_from_report, rank_report, suggest_lora_alpha, suggest_rank
from lora_ext.model import lora_layers


@pytest.mark.parametrize(
    ("task", "size", "expected"),
    [
        ("simple", "1B", 8),
        ("simple", "70B", 8),
        ("medium", "1B", 16),
        ("medium", 6.9e9, 16),
        ("medium", "7B", 32),
        ("medium", 7_000_000_000, 32),
        ("complex", "350M", 64),
        ("complex", "1.5b", 64),
        ("complex", " 13B ", 128),
        ("complex", "70B", 128),
        ("Complex", "7B", 128),
        ("translation", "7B", 16),
        (None, "1B", 16),
        ("", 10**12, 16),
    ],
)
def test_suggest_rank_table(task, size, expected):
    assert suggest_rank(task, size) == expected


@pytest.mark.parametrize(
    ("size", "exc"),
    [("seven billion", ValueError), ("0B", ValueError), (-5, ValueError), (True, TypeError), ([7], TypeError)],
)
def test_suggest_rank_bad_model_size(size, exc):
    with pytest.raises(exc, match="model_size"):
        suggest_rank("medium", size)


def test_suggest_lora_alpha():
    assert suggest_lora_alpha(16) == 16 and suggest_lora_alpha(16, stronger=True) == 32
    with pytest.raises(ValueError, match="positive integer"):
        suggest_lora_alpha(0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 24)
        self.wide = nn.Linear(6, 50)  # d_in < r: the update's rank is at most 6
        self.emb = nn.Embedding(30, 12)

    def forward(self, x):
        return self.fc(x)


def _full_sv(layer, name):
    a, b = layer.delta_factors(name)
    return torch.linalg.svdvals(layer.scaling[name] * (b.detach().double() @ a.detach().double()))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_singular_values_equal_the_full_svd(use_rslora):
    torch.manual_seed(0)
    net = _Net()
    cfg = lora_ext.LoraConfig(
        r=8, lora_alpha=12, target_modules=["fc", "wide", "emb"], init_lora_weights=False, use_rslora=use_rslora
    )
    lora_ext.inject_adapter(net, cfg)
    report = {row["name"]: row for row in rank_report(net, energy=0.8)}
    assert set(report) == {"fc", "wide", "emb"}
    layers = dict(lora_layers(net))
    for name, row in report.items():
        full = _full_sv(layers[name], "default")
        sv = row["singular_values"]
        assert sv.dtype == torch.float64 and len(sv) == min(8, row["d_in"], row["d_out"])
        torch.testing.assert_close(sv, full[: len(sv)], rtol=1e-10, atol=1e-12)
        assert torch.all(full[len(sv) :] < 1e-10)
        sq = full.square()
        brute = next(k for k in range(1, len(full) + 1) if sq[:k].sum() >= 0.8 * sq.sum())
        assert row["effective_rank"] == brute
        assert row["energy_captured"] >= 0.8
        assert row["params"] == 8 * (row["d_in"] + row["d_out"])
        assert row["params_saved"] == (8 - max(brute, 1)) * (row["d_in"] + row["d_out"])
    assert report["fc"]["d_in"] == 40 and report["fc"]["d_out"] == 24
    assert report["emb"]["d_in"] == 30 and report["emb"]["d_out"] == 12  # the embedding update is [V, D]ᵀ


def test_report_on_an_nf4_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    lora_ext.quantize_model(net, skip_modules=())
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    (row,) = rank_report(net)
    torch.testing.assert_close(row["singular_values"], _full_sv(net[0], "default")[:4], rtol=1e-10, atol=1e-12)


def test_fresh_adapter_has_effective_rank_zero_and_energy_one():
    net = _Net()
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=4, target_modules=["fc"]))  # B = 0
    (row,) = rank_report(net)
    assert row["effective_rank"] == 0 and torch.count_nonzero(row["singular_values"]) == 0
    assert rank_pattern_from_report([row]) == {"fc": 1}
    torch.manual_seed(1)
    net = _Net()
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=4, target_modules=["fc"], init_lora_weights=False))
    assert rank_report(net, energy=1.0)[0]["effective_rank"] == 4


def test_report_errors():
    net = _Net()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        rank_report(net)
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=4, target_modules=["fc"]))
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=2, target_modules=["fc"]), "other")
    for energy in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="energy must be"):
            rank_report(net, energy=energy)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        rank_report(net, "nope")
    assert rank_report(net, "other")[0]["r"] == 2
    lora_ext.set_adapter(net, ["default", "other"])
    with pytest.raises(ValueError, match="pass adapter_name"):
        rank_report(net)
    with pytest.raises(ValueError, match="min_rank"):
        rank_pattern_from_report([], min_rank=0)


def test_trained_adapter_finds_the_true_rank():
    """y = x (W + U V)ᵀ with a rank-2 U V: an r = 8 adapter trained to fit it uses 2 directions."""
    g = torch.Generator().manual_seed(0)
    net = _Net()
    d_out, d_in = net.fc.weight.shape
    u, v = torch.randn(d_out, 2, generator=g), torch.randn(2, d_in, generator=g)
    true_delta = (u * torch.tensor([1.0, 0.5])) @ v / d_in**0.5
    x = torch.randn(512, d_in, generator=g)
    with torch.no_grad():
        y = net.fc(x) + x @ true_delta.t()
    torch.manual_seed(0)
    lora_ext.inject_adapter(net, lora_ext.LoraConfig(r=8, lora_alpha=8, target_modules=["fc"]))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-4
    (row,) = rank_report(net, energy=0.99)
    sv = row["singular_values"]
    torch.testing.assert_close(sv[:2], torch.linalg.svdvals(true_delta.double())[:2], rtol=2e-2, atol=0)
    assert sv[2] < 1e-2 * sv[1]
    assert row["effective_rank"] == 2
    assert row["params_saved"] == (8 - 2) * (d_in + d_out)
    pattern = rank_pattern_from_report([row])
    assert pattern == {"fc": 2}

    fresh = _Net()
    lora_ext.inject_adapter(fresh, lora_ext.LoraConfig(r=8, target_modules=["fc", "wide"], rank_pattern=pattern))
    layers = dict(lora_layers(fresh))
    assert layers["fc"].r["default"] == 2 and layers["wide"].r["default"] == 8
