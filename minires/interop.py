"""PyTorch interop: move weights between PyTorch and minires.

torch is imported only inside these functions: it is never a dependency of
minires, only an oracle for tests and a source of pretrained weights.
Key names already match (torchvision's), so conversion is tensor <-> array.
"""
import numpy


def state_dict_from_torch(torch_state_dict):
    """PyTorch state dict (name -> tensor) -> dict name -> NumPy array for
    ``Module.load_state_dict``."""
    return {name: t.detach().cpu().numpy().copy() for name, t in torch_state_dict.items()}


def state_dict_to_torch(state_dict):
    """minires state dict (name -> NumPy array) -> dict name -> torch tensor,
    for ``torch.nn.Module.load_state_dict``."""
    import torch

    return {name: torch.from_numpy(numpy.array(a, copy=True)) for name, a in state_dict.items()}


def load_from_torch(model, torch_module):
    """Copy a PyTorch module's parameters and buffers into ``model``; returns model."""
    return model.load_state_dict(state_dict_from_torch(torch_module.state_dict()))
