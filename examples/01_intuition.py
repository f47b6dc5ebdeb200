"""The idea in one screen: a weight W (out×in) becomes B (out×r) · A (r×in).

Part 1, a toy: a rank-2 10×10 W. Its SVD W = U·Σ·Vᵀ has two non-zero singular values, so
B = U_r·Σ_r (10×2) and A = V_rᵀ (2×10) rebuild it exactly: y = W·x + b equals (B·A)·x + b = B·(A·x) + b,
with 40 parameters instead of 100.
Part 2, a real layer (SmolLM2's model.layers.0.mlp.up_proj by default): real weights are not low rank,
so cutting the rank costs error. Prints, per rank, the parameters kept and the relative error ‖W − B·A‖/‖W‖.

    python examples/01_intuition.py [--model FOLDER] [--layer NAME]
"""
import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
parser.add_argument("--layer", default="model.layers.0.mlp.up_proj")
args = parser.parse_args()
weights = Path(args.model) / "model.safetensors"
if not weights.exists():
    print(f"{args.model} has no model.safetensors; prepare it with: python scripts/prepare_examples.py")
    sys.exit(2)

torch.manual_seed(0)
W = torch.randn(10, 2) @ torch.randn(2, 10)  # rank 2 by construction
b, x = torch.randn(10), torch.randn(10)
U, S, Vh = torch.linalg.svd(W)
print("singular values:", " ".join(f"{s:.2f}" for s in S))
r = 2
B, A = U[:, :r] * S[:r], Vh[:r]  # B = U_r·Σ_r (10×2), A = V_rᵀ (2×10)
print(f"B {tuple(B.shape)}, A {tuple(A.shape)}: {W.numel()} parameters against {B.numel() + A.numel()}")
print(f"max |W·x + b − (B·(A·x) + b)| = {(W @ x + b - (B @ (A @ x) + b)).abs().max():.1e}")

with safe_open(weights, "pt") as f:
    W = f.get_tensor(f"{args.layer}.weight").float()  # (out, in)
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
out_dim, in_dim = W.shape
print(f"\n{args.layer}: {out_dim}×{in_dim}, {W.numel():,} parameters")
print(f"{'rank':>6} {'params kept':>12} {'relative error':>15}")
for fraction in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1):
    r = max(1, int(fraction * min(W.shape)))
    approx = (U[:, :r] * S[:r]) @ Vh[:r]  # B·A at rank r
    error = torch.linalg.norm(W - approx) / torch.linalg.norm(W)
    print(f"{r:>6} {r * (out_dim + in_dim) / W.numel():>12.1%} {error:>15.4f}")
print("past r = out·in/(out+in) the pair holds more parameters than W: lora-compress leaves such a layer dense")
