"""What PACGen measures in the batch-size study: how much of Ψ the curvature decides.

    python examples/pacgen_weight_floor.py      # about 1.5 minutes on 2 CPU cores, offline

Retrains the study's MLP (mnist1d, 40-256-256-10, SGD at lr 0.1, seed 0) at batch sizes 16, 64,
256 and 1024 until the loss on the whole training set is <= 0.05, as ``lightning-flatness sweep``
does (plain PyTorch here, so the runs match the sweep's recipe, not its exact weights). On each
final model, on the sweep's 512-sample measurement size, it prints

* the top Hessian eigenvalue ``λ`` and PACGen's ``ρ``;
* Ψ and PACGen's cost given the bound ``H_ii <= 2λ`` (``pacgen(..., hessian_max=2λ)``): 6
  HVPs is ``ρ`` alone (every coordinate at its curvature floor ``1/N_i``), ``6 + k`` means ``k``
  coordinates were off the floor's bound and got their exact ``H_ii``, 22 that the whole
  diagonal was estimated;
* Ψ's weights-only part ``Σ_i log(1 + |w_i|/N_i)`` with ``N_i = 0.1|w_i| + 0.1``, and ``Σ|w_i|``.

When Ψ equals its weights-only part, the curvature does not enter it at all and Ψ orders the
runs like the weights' magnitudes (see docs/study.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_flatness.study.training import mlp
from lightning_flatness.study.data import load_dataset
from lightning_flatness.functional import hessian_eigenvalues, pacgen

TARGET_TRAIN_LOSS = 0.05


def train_to_target(data, batch_size: int, lr: float = 0.1, seed: int = 0, max_epochs: int = 2000) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(seed)
    model = mlp(data.in_features, [256, 256], data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = data.loader("train", batch_size, shuffle=True, seed=seed)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            if F.cross_entropy(model(data.x_train), data.y_train).item() <= TARGET_TRAIN_LOSS:
                break
    return model, epoch


def main() -> None:
    data = load_dataset("mnist1d")
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:512]
    batches = [(data.x_train[order[i : i + 64]], data.y_train[order[i : i + 64]]) for i in range(0, 512, 64)]
    print("batch  epochs  gap    λ_max   ρ        Ψ         weights-only  PACGen HVPs  Σ|w|")
    for batch_size in (16, 64, 256, 1024):
        model, epochs = train_to_target(data, batch_size)
        with torch.no_grad():
            gap = F.cross_entropy(model(data.x_test), data.y_test).item() - F.cross_entropy(model(data.x_train), data.y_train).item()
        lam = hessian_eigenvalues(model, batches).values[0].item()
        result = pacgen(model, batches, hessian_max=2 * lam, generator=0)
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().abs()
        weights_only = torch.log1p(w / (0.1 * w + 0.1)).sum().item()
        print(f"{batch_size:5d}  {epochs:6d}  {gap:.3f}  {lam:6.2f}  {result.rho:.2e}  {result.value:9.1f}  "
              f"{weights_only:12.1f}  {result.n_hvp:11d}  {w.sum().item():6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
