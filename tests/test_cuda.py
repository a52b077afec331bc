"""On a CUDA device every estimator gives the CPU's numbers (float64, same seeds)."""

import pytest
import torch

from lightning_flatness.functional import hessian_eigenvalues
from tests.helpers.estimators import ALL_ESTIMATORS as ESTIMATORS
from tests.helpers.models import cnn_batches, tiny_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



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
