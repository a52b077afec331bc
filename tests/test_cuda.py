"""On a CUDA device every estimator gives the CPU's numbers (float64, same seeds)."""

import pytest
import torch

from conftest import cnn_batches, tiny_cnn
from lightning_flatness.functional import (
    fisher_trace,
    grad_cosine_regret,
    hessian_diagonal,
    hessian_eigenvalues,
    hessian_trace,
    pacgen,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ESTIMATORS = {
    "eigen": lambda m, b: hessian_eigenvalues(m, b, k=2, tol=1e-10).values,
    "trace": lambda m, b: torch.tensor(hessian_trace(m, b, num_probes=5, generator=1).value),
    "diagonal": lambda m, b: hessian_diagonal(m, b, num_probes=5, generator=1),
    "regret": lambda m, b: torch.tensor(grad_cosine_regret(m, b).regret),
    "fisher": lambda m, b: torch.tensor(fisher_trace(m, b).value),
    "fisher_mc": lambda m, b: torch.tensor(fisher_trace(m, b, kind="mc", num_samples=3, generator=1).value),
    "pacgen": lambda m, b: torch.tensor(pacgen(m, b, num_probes=5, generator=1).value),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_cuda_matches_cpu(name):
    model, batches = tiny_cnn(), cnn_batches()
    cpu = ESTIMATORS[name](model, batches)
    gpu_model = tiny_cnn().cuda()
    # CPU batches: the estimators move each batch to the model's device.
    gpu = ESTIMATORS[name](gpu_model, batches).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-9, atol=1e-12)
    cuda_rng = torch.cuda.get_rng_state()
    ESTIMATORS[name](gpu_model, [(x.cuda(), y.cuda()) for x, y in batches])
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


def test_bf16_model_on_cuda_is_measured_in_float32():
    model = tiny_cnn().float().cuda().bfloat16()
    batches = [(x.float(), y) for x, y in cnn_batches()]
    result = hessian_eigenvalues(model, batches)
    assert result.values.dtype == torch.float32 and result.values.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(hessian_eigenvalues(model, batches).values, result.values)
