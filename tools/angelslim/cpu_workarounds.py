"""Run-time workarounds that let angelslim 0.5.0's GPTQ and AWQ run on a CPU (no installed file is edited).

1. Hard-coded CUDA devices (GPTQ and AWQ).

angelslim 0.5.0 picks the device for GPTQ/AWQ calibration as a literal, not from the model:
`models/base_model.py::model_forward` uses `device = "cuda:0"` when the algorithm is gptq/awq/gptaq and
`compressor/quant/modules/gptq/gptq.py::GPTQ.run` uses `dev = f"cuda:{self.rank}"`; both then call
`.to(device)` on tensors and modules. `gptq_module.py` also calls `torch.cuda.synchronize()`.
These are local variables, so the narrowest run-time fix is to turn a CUDA target of `.to()`/`.cuda()`
into the CPU while the PTQ steps run, and make `torch.cuda.synchronize()` a no-op on a machine without CUDA.

2. AWQ's scale search relies on `.to(device)` making a copy (AWQ only).
`compressor/quant/modules/awq/search.py::AWQSearch.search_by_block` keeps `org_w = [w.clone().cpu()]`, and for
each of its 20 grid ratios scales the weights in place (`layer.weight.mul_`, then `.data.copy_` of the
fake-quantized weight) and restores them with `layer.weight.data = w.to(dev)`. On a GPU that `.to` copies,
so `org_w` stays pristine. On the CPU (`dev` is "cpu") `.to` returns `w` itself: the layer then shares
storage with `org_w`, the next ratio's in-place scaling corrupts the saved original, and the errors compound
(every ratio is judged on already-scaled weights and the saved checkpoint holds weights scaled by the product
of all tried scales). `tensor_to_always_copies` gives `.to` the GPU's copy semantics while that search runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

CPU = torch.device("cpu")


def _is_cuda(device: Any) -> bool:
    """True for "cuda", "cuda:N", torch.device("cuda", N) and a bare CUDA index int."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0].strip() == "cuda"
    # A bare int passed to .to() is a CUDA device index.
    return isinstance(device, int) and not isinstance(device, bool)


def _redirect_args(args: tuple, kwargs: dict) -> tuple[tuple, dict, int]:
    """Replace CUDA devices among `.to()` arguments by the CPU; return how many were replaced."""
    replaced = 0
    new_args = []
    for arg in args:
        if _is_cuda(arg):
            arg, replaced = CPU, replaced + 1
        new_args.append(arg)
    if _is_cuda(kwargs.get("device")):
        kwargs = {**kwargs, "device": CPU}
        replaced += 1
    return tuple(new_args), kwargs, replaced


@contextlib.contextmanager
def cuda_requests_go_to_cpu(counter: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Within the block, `.to("cuda…")`/`.cuda()` on tensors and modules land on the CPU.

    Only applies when CUDA is unavailable. `counter["redirected"]` counts the redirected calls, so a caller
    can report whether the workaround was exercised at all.
    """
    counter = counter if counter is not None else {}
    counter.setdefault("redirected", 0)
    if torch.cuda.is_available():
        yield counter
        return

    originals = {
        "tensor_to": torch.Tensor.to,
        "module_to": torch.nn.Module.to,
        "tensor_cuda": torch.Tensor.cuda,
        "module_cuda": torch.nn.Module.cuda,
        "synchronize": torch.cuda.synchronize,
    }

    def tensor_to(self, *args, **kwargs):
        args, kwargs, replaced = _redirect_args(args, kwargs)
        counter["redirected"] += replaced
        return originals["tensor_to"](self, *args, **kwargs)

    def module_to(self, *args, **kwargs):
        args, kwargs, replaced = _redirect_args(args, kwargs)
        counter["redirected"] += replaced
        return originals["module_to"](self, *args, **kwargs)

    def tensor_cuda(self, *args, **kwargs):
        counter["redirected"] += 1
        return originals["tensor_to"](self, CPU)

    def module_cuda(self, *args, **kwargs):
        counter["redirected"] += 1
        return originals["module_to"](self, CPU)

    def synchronize(*args, **kwargs):
        counter["redirected"] += 1

    torch.Tensor.to = tensor_to
    torch.nn.Module.to = module_to
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    torch.cuda.synchronize = synchronize
    try:
        yield counter
    finally:
        torch.Tensor.to = originals["tensor_to"]
        torch.nn.Module.to = originals["module_to"]
        torch.Tensor.cuda = originals["tensor_cuda"]
        torch.nn.Module.cuda = originals["module_cuda"]
        torch.cuda.synchronize = originals["synchronize"]


@contextlib.contextmanager
def tensor_to_always_copies(counter: dict[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Within the block, `tensor.to(...)` returns a new tensor even when nothing needs converting.

    That is what a move to another device does anyway; here it keeps code that restores saved weights with
    `.to(dev)` from aliasing them. `counter["copied"]` counts the copies made.
    """
    counter = counter if counter is not None else {}
    counter.setdefault("copied", 0)
    original_to = torch.Tensor.to

    def copying_to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        if result is self:
            counter["copied"] += 1
            return self.clone()
        return result

    torch.Tensor.to = copying_to
    try:
        yield counter
    finally:
        torch.Tensor.to = original_to


def patch_awq_search_copy_semantics(counter: dict[str, int]) -> None:
    """Wrap `AWQSearch.search_by_block` in `tensor_to_always_copies` (see the module docstring, item 2).

    Raises RuntimeError if angelslim no longer has that method, so a changed angelslim is noticed.
    """
    from angelslim.compressor.quant.modules.awq import search

    original = getattr(search.AWQSearch, "search_by_block", None)
    if original is None:
        raise RuntimeError("angelslim AWQSearch.search_by_block not found; review tools/angelslim/cpu_workarounds.py")
    if getattr(original, "_copies_on_to", False):
        return

    def search_by_block(self, *args, **kwargs):
        with tensor_to_always_copies(counter):
            return original(self, *args, **kwargs)

    search_by_block._copies_on_to = True
    search.AWQSearch.search_by_block = search_by_block
