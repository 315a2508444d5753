"""scale_grad (methods/_grad.py, used by AGM): identity in forward, the gradient times the scale in
backward — a number or a per-sample tensor, applied at the input's precision and on its device."""
import torch

from mmbalance.methods._grad import scale_grad


def test_forward_is_the_identity_and_backward_scales_the_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_grad(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [2.5, 5.0, 7.5]
    # a per-sample scale tensor broadcast over the features, itself never receiving a gradient
    h = torch.ones(2, 3, requires_grad=True)
    k = torch.tensor([[0.5], [-1.0]], requires_grad=True)
    scale_grad(h, k).sum().backward()
    assert h.grad.tolist() == [[0.5] * 3, [-1.0] * 3] and k.grad is None


def test_a_python_float_scale_is_applied_at_the_inputs_precision():
    """float64 features, scale 0.1: the gradient is exactly float64's 0.1 (not float32's
    0.10000000149...), so a float64 model's update matches its hand-computed reference."""
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    scale_grad(x, 0.1).sum().backward()
    assert x.grad.dtype == torch.float64
    assert x.grad.tolist() == [0.1] * 4


def test_a_scale_tensor_on_another_device_follows_the_input():
    """A per-sample scale computed on the CPU for features on an accelerator (here the ``meta``
    device, which refuses mixed-device arithmetic like CUDA does) is moved to the features'
    device: forward and backward run there."""
    x = torch.ones(3, 2, device="meta", requires_grad=True)
    y = scale_grad(x, torch.tensor([[1.0], [2.0], [3.0]]))
    y.sum().backward()
    assert y.device.type == "meta" and x.grad.device.type == "meta" and x.grad.shape == (3, 2)
