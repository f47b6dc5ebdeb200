"""Mixture-of-experts benchmarks on tiny random models (no real MoE checkpoint installs offline).

shared    per-expert SVD against a basis shared across a layer's experts (--method shared-basis),
          output error against parameters kept, experts only. Two kinds of experts: transformers'
          random initialisation (independent experts) and "upcycled" ones (each layer's experts one
          random MLP plus a 20% drift of their own, as sparse upcycling and then training leave them).
fallback  whitened against plain SVD of one expert from few calibration tokens (synthetic inputs):
          why an expert routed fewer than --expert-min-tokens falls back to its weight spectrum.

Usage: python scripts/bench_experts.py [--part shared|fallback|all]
"""
from __future__ import annotations

import argparse

import torch

from lora_compress import CompressConfig, SharedBasisConfig, SvdConfig, compress_
from lora_compress.core.experts import fused_experts
from lora_compress.core.svd import factorize
from lora_compress.core.whitening import Whitening

RATIOS = (0.2, 0.3, 0.4, 0.5)
METHODS = {"per-expert SVD": SvdConfig(), "shared A": SharedBasisConfig(side="input"),
           "shared B": SharedBasisConfig(side="output"), "shared-basis auto": SharedBasisConfig()}


def build(kind: str, experts: str):
    """A tiny random Mixtral- or Qwen3-MoE-shaped model, its experts random or upcycled."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 num_local_experts=8, num_experts_per_tok=2))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                   moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=16, num_experts=16,
                                                   num_experts_per_tok=2))
    if experts == "upcycled":
        with torch.no_grad():
            for module in fused_experts(model).values():
                for tensor in (module.gate_up_proj, module.down_proj):
                    tensor.copy_(tensor[:1] + 0.2 * tensor)  # one MLP for all, each expert its own 20% drift
    return model.eval()


def experts_inputs(model, ids):
    """Every experts module's call (hidden states, top-k index, top-k weights) on ``ids``."""
    calls = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: calls.__setitem__(n, args))
               for n, m in fused_experts(model).items()]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return calls


@torch.no_grad()
def experts_error(dense, compressed, calls) -> float:
    """Relative error of the compressed experts' outputs, fed the dense experts' inputs, over all layers."""
    diff = ref = 0.0
    for name, args in calls.items():
        want, got = dense.get_submodule(name)(*args), compressed.get_submodule(name)(*args)
        diff, ref = diff + float((got - want).pow(2).sum()), ref + float(want.pow(2).sum())
    return (diff / ref) ** 0.5


def shared_table() -> None:
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    print("| model | experts | cut to | " + " | ".join(f"{m}: error / params kept" for m in METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for kind in ("mixtral", "qwen3_moe"):
        for experts in ("random", "upcycled"):
            dense = build(kind, experts)
            calls = experts_inputs(dense, ids)
            for ratio in RATIOS:
                cells = []
                for method in METHODS.values():
                    model = build(kind, experts)
                    report = compress_(model, CompressConfig(ratio=ratio, method=method, include=("experts",)),
                                       progress=False)
                    kept = report.params / report.dense_params
                    cells.append(f"{experts_error(dense, model, calls):.4f} / {kept:.3f}")
                print(f"| {kind} | {experts} | {ratio:.0%} | " + " | ".join(cells) + " |")


def fallback_table() -> None:
    """Held-out output error of one expert (rank in/4) whitened on t tokens, against plain SVD (mean of 5 draws)."""
    torch.manual_seed(0)
    counts = (1, 4, 16, "in/4", "in", "2·in")
    print("| in | input spectrum | plain SVD | " + " | ".join(f"whitened, t = {t}" for t in counts) + " |")
    print("|---|---|---|" + "---|" * len(counts))
    for n, m in ((64, 128), (256, 512)):
        weight = torch.randn(m, n, dtype=torch.float64) / n ** 0.5
        for decay in (0.5, 1.5):
            basis = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
            scale = basis * torch.arange(1, n + 1, dtype=torch.float64).pow(-decay / 2)  # x = z·scaleᵀ
            test = torch.randn(20000, n, dtype=torch.float64) @ scale.T
            reference = (test @ weight.T).norm()
            plain = factorize(weight, n // 4, solver="full")
            cells = [f"{float((test @ (weight - plain.B @ plain.A).T).norm() / reference):.3f}"]
            for tokens in (1, 4, 16, n // 4, n, 2 * n):
                errors = []
                for _ in range(5):
                    x = torch.randn(tokens, n, dtype=torch.float64) @ scale.T
                    f = Whitening(weight, x.T @ x).factors(n // 4)
                    errors.append(float((test @ (weight - f.B @ f.A).T).norm() / reference))
                cells.append(f"{sum(errors) / len(errors):.3f}")
            print(f"| {n} | σ²_k ∝ k^-{decay} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["shared", "fallback", "all"])
    part = parser.parse_args().part
    if part in ("shared", "all"):
        shared_table()
    if part in ("fallback", "all"):
        fallback_table()


if __name__ == "__main__":
    main()
