"""Quantizing a whole model: the Linears to quantize, RTN over them, and GPTQ layer by layer (with one
decoder layer resident when the weights come from a lazy source)."""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_workbook.quantize.gptq import HessianAccumulator, run_gptq
from llm_workbook.quantize.rtn import (
    DEFAULT_SKIP, RTN_METHODS, QuantizedLinear, check_bits, check_group_size, quantize_rtn,
)


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the wanted inputs are recorded."""


_DECODER_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "layers",
)


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    for pattern in skip:
        if pattern in name:
            return True
        try:
            if re.search(pattern, name):
                return True
        except re.error:
            pass  # not a regex: the substring test above decided
    return False


def find_quantizable_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by full module name, minus those matching a skip pattern.

    A pattern matches when it is a substring of the name or ``re.search`` finds it in the name.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _is_skipped(name, skip)
    }


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"{type(model).__name__}: no decoder layer list found (looked for {', '.join(_DECODER_LAYER_PATHS)})"
    )


def _calibration_chunks(input_ids: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Split calibration ids into ``[b, seq]`` LongTensor chunks (sequences of unequal length go alone)."""
    if batch_size < 1:
        raise ValueError(f"calibration_batch_size must be >= 1, got {batch_size}")
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"calibration_input_ids must be [n, seq], got shape {tuple(input_ids.shape)}")
        sequences = [ids]
    else:
        sequences = [t.unsqueeze(0) if t.dim() == 1 else t for t in input_ids]
    chunks: list[torch.Tensor] = []
    for seq in sequences:
        if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.numel() == 0:
            raise ValueError("calibration_input_ids: every item must be a non-empty [seq] or [n, seq] tensor")
        if seq.is_floating_point() or seq.dtype == torch.bool:
            raise ValueError(f"calibration_input_ids must hold integer token ids, got {seq.dtype}")
        chunks.extend(seq.long().split(batch_size, dim=0))
    if not chunks:
        raise ValueError("calibration_input_ids is empty")
    return chunks


class LayerWeights(Protocol):
    """Where the weights of a decoder layer come from when the model keeps them on the meta device."""

    def load(self, prefix: str, layer: nn.Module) -> None:
        """Give every parameter of ``layer`` (named ``prefix.<name>`` in the source) its float32 value."""

    def release(self, layer: nn.Module) -> None:
        """Move the parameters of ``layer`` back to the meta device."""


@dataclass
class _LayerCall:
    """How the model called one decoder layer: positional args after the hidden states, and kwargs."""

    args: tuple
    kwargs: dict[str, Any]


def _capture_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[_LayerCall]]:
    """Hidden states entering layer 0 and the extra args/kwargs of every layer, for one id chunk.

    Each layer's forward is temporarily replaced by a recorder that passes the hidden states through
    unchanged (so masks and position embeddings are seen exactly as the model builds them, per layer,
    e.g. sliding vs full attention) and the last layer stops the forward.
    """
    hidden: list[torch.Tensor] = []
    calls: list[_LayerCall | None] = [None] * len(layers)

    def make_recorder(index: int):
        def recorder(*args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                states, rest = args[0], tuple(args[1:])
            else:
                states, rest = kwargs.pop("hidden_states"), ()
            calls[index] = _LayerCall(rest, kwargs)
            if index == 0:
                hidden.append(states)
            if index == len(layers) - 1:
                raise _StopForward
            return states

        return recorder

    for index, layer in enumerate(layers):
        layer.forward = make_recorder(index)  # instance attribute shadows the class method
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    missing = [i for i, call in enumerate(calls) if call is None]
    if not hidden or missing:
        raise ValueError(f"{type(model).__name__}: decoder layers {missing or [0]} were not called by the forward pass")
    return hidden[0], calls  # type: ignore[return-value]


def _run_layer(layer: nn.Module, states: torch.Tensor, call: _LayerCall) -> torch.Tensor:
    out = layer(states, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sequential_groups(
    layer: nn.Module, linears: dict[str, nn.Linear], states: torch.Tensor, call: _LayerCall
) -> list[list[str]]:
    """Linears of one layer in call order, grouped when consecutive ones read the same input tensor.

    For a Llama/Qwen layer: [q, k, v], [o], [gate, up], [down] (the reference "true sequential" order).
    Linears never called by the probe forward come last, together.
    """
    calls: list[tuple[str, torch.Tensor]] = []  # inputs are kept alive so their ids stay unique

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((name, args[0] if args else kwargs["input"]))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, module in linears.items()]
    try:
        _run_layer(layer, states, call)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous_input: torch.Tensor | None = None
    for name, inputs in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and inputs is previous_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_input = inputs
    never_called = [name for name in linears if name not in seen]
    if never_called:
        groups.append(never_called)
    return groups


def _collect_hessians(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    states: list[torch.Tensor],
    calls: list[_LayerCall],
) -> dict[str, HessianAccumulator]:
    """Hessians of ``linears`` over all calibration chunks.

    Each forward stops once every Linear of the group has seen its input (a Linear called twice in
    one layer forward would only count its first call). Linears that read the very same input tensor
    (q/k/v, gate/up) share one accumulator: their Hessians are the same sums, computed once.
    """
    accumulators: dict[str, HessianAccumulator] = {}
    pending: set[str] = set()
    # this forward: input id -> (input, the Hessian it went into); Hessian id -> the input it got
    read: dict[int, tuple[torch.Tensor, HessianAccumulator]] = {}
    fed: dict[int, torch.Tensor] = {}

    def make_hook(name: str, in_features: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else kwargs["input"]
            mine = accumulators.get(name)
            if mine is None:
                seen = read.get(id(inputs))
                if seen is not None and seen[0] is inputs:  # first chunk: both start from zero, so they share
                    mine = accumulators[name] = seen[1]
                else:
                    mine = accumulators[name] = HessianAccumulator(in_features, name=name)
            given = fed.get(id(mine))
            if given is None:
                mine.add_batch(inputs)
                fed[id(mine)] = inputs
                read[id(inputs)] = (inputs, mine)
            elif given is not inputs:
                raise ValueError(f"{name}: shares its Hessian with another Linear but read a different input")
            pending.discard(name)
            if not pending:
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, module.in_features), with_kwargs=True)
               for name, module in linears.items()]
    try:
        for chunk_states, call in zip(states, calls):
            pending.update(linears)
            read.clear()
            fed.clear()
            try:
                _run_layer(layer, chunk_states, call)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for name, module in linears.items():  # a Linear the forwards never reached has an empty Hessian
        accumulators.setdefault(name, HessianAccumulator(module.in_features, name=name))
    return accumulators


def _resolve_bits(method: str, bits: int | None) -> int:
    if method in RTN_METHODS:
        if bits is not None and bits != RTN_METHODS[method]:
            raise ValueError(f"method {method!r} implies bits={RTN_METHODS[method]}, got bits={bits}")
        return RTN_METHODS[method]
    if method == "rtn":
        if bits is None:
            raise ValueError("method 'rtn' needs bits")
        return bits
    if method == "gptq":
        return 4 if bits is None else bits
    raise ValueError(f"unknown method {method!r}; expected one of {sorted(RTN_METHODS) + ['rtn', 'gptq']}")


def quantize_model(
    model: nn.Module,
    method: str,
    calibration_input_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    bits: int | None = None,
    group_size: int = -1,
    symmetric: bool = True,
    skip: Sequence[str] = DEFAULT_SKIP,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    true_sequential: bool = True,
    calibration_batch_size: int = 8,
    progress: bool = True,
    layer_weights: LayerWeights | None = None,
) -> dict[str, QuantizedLinear]:
    """Quantize every ``nn.Linear`` of a HF causal LM not matched by ``skip``; returns codes by module name.

    ``method``: ``"int8"``, ``"int4"``, ``"int2"`` (RTN with those bits), ``"rtn"`` (RTN, ``bits`` given)
    or ``"gptq"`` (``bits`` defaults to 4; needs ``calibration_input_ids``, ``[n, seq]`` token ids or a
    list of sequences).  The model's weights are left as they were on return.

    GPTQ runs layer by layer, as in the paper: the inputs to decoder layer 0 are captured for the
    calibration batch; in each layer the Linears are processed in "true sequential" groups (those
    reading the same input together: q/k/v, then o, then gate/up, then down), each group's Hessians
    collected with the layer's earlier groups already quantized (``true_sequential=False``: all
    Linears of the layer from the float layer at once).  The layer's outputs, computed with its
    dequantized weights, feed the next layer; then its original weights are restored.

    ``layer_weights`` (GPTQ only): the decoder layers of ``model`` hold no weights (the meta device) and
    each is loaded through it before its turn and released after, so one layer is resident at a time;
    the weights outside the layers (embeddings) are released once layer 0's inputs are captured.
    """
    resolved_bits = _resolve_bits(method, bits)
    check_bits(resolved_bits)
    check_group_size(group_size)
    linears = find_quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"{type(model).__name__}: no nn.Linear left to quantize after skip={tuple(skip)}")
    if method != "gptq":
        return _quantize_model_rtn(linears, resolved_bits, group_size, symmetric, progress)
    if calibration_input_ids is None:
        raise ValueError("method 'gptq' needs calibration_input_ids")
    options = dict(
        bits=resolved_bits, group_size=group_size, symmetric=symmetric, damp_percent=damp_percent,
        block_size=block_size, act_order=act_order, static_groups=static_groups,
    )
    chunks = _calibration_chunks(calibration_input_ids, calibration_batch_size)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None:
        for chunk in chunks:
            if int(chunk.min()) < 0 or int(chunk.max()) >= vocab_size:
                raise ValueError(f"calibration_input_ids: token ids must lie in [0, {vocab_size})")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _quantize_model_gptq(model, linears, chunks, options, true_sequential, progress, layer_weights)
    finally:
        model.train(was_training)


def _quantize_model_rtn(
    linears: dict[str, nn.Linear], bits: int, group_size: int, symmetric: bool, progress: bool
) -> dict[str, QuantizedLinear]:
    return {
        name: quantize_rtn(module.weight, bits, group_size, symmetric, name=name)
        for name, module in tqdm(linears.items(), desc=f"RTN int{bits}", disable=not progress)
    }


def _quantize_model_gptq(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    chunks: list[torch.Tensor],
    options: dict[str, Any],
    true_sequential: bool,
    progress: bool,
    layer_weights: LayerWeights | None,
) -> dict[str, QuantizedLinear]:
    prefix, layers = find_decoder_layers(model)
    per_layer: list[dict[str, nn.Linear]] = [
        {name: m for name, m in linears.items() if name.startswith(f"{prefix}.{index}.")} for index in range(len(layers))
    ]
    outside = sorted(set(linears) - {name for group in per_layer for name in group})
    if outside:
        raise ValueError(
            f"GPTQ quantizes Linears inside {prefix}.* only; add these to skip or use RTN: {outside}"
        )

    captured = [_capture_layer_calls(model, layers, chunk) for chunk in chunks]
    states = [hidden for hidden, _ in captured]
    if layer_weights is not None:
        layer_weights.release(model)  # the embeddings are not needed past layer 0's inputs
    results: dict[str, QuantizedLinear] = {}
    with tqdm(range(len(layers)), desc=f"GPTQ int{options['bits']}", disable=not progress) as bar:
        for index in bar:
            layer, targets = layers[index], per_layer[index]
            calls = [layer_calls[index] for _, layer_calls in captured]
            if layer_weights is not None:
                layer_weights.load(f"{prefix}.{index}", layer)
                originals = {}
            else:
                originals = {name: module.weight.detach().clone() for name, module in targets.items()}
            try:
                if targets:
                    bar.set_postfix_str(f"{len(targets)} linears")
                    results.update(_quantize_layer(layer, targets, states, calls, options, true_sequential))
                # The next layer sees this one's output with its quantized weights, as in GPTQ.
                states = [_run_layer(layer, chunk_states, call) for chunk_states, call in zip(states, calls)]
            finally:
                if layer_weights is not None:
                    layer_weights.release(layer)
                for name, module in targets.items():
                    if name in originals:
                        module.weight.data.copy_(originals[name])
    return results


def _quantize_layer(
    layer: nn.Module,
    targets: dict[str, nn.Linear],
    states: list[torch.Tensor],
    calls: list[_LayerCall],
    options: dict[str, Any],
    true_sequential: bool,
) -> dict[str, QuantizedLinear]:
    """GPTQ every target Linear of one decoder layer, writing dequantized weights into the layer as it goes."""
    groups = _sequential_groups(layer, targets, states[0], calls[0]) if true_sequential else [list(targets)]
    results: dict[str, QuantizedLinear] = {}
    for group in groups:
        group_linears = {name: targets[name] for name in group}
        accumulators = _collect_hessians(layer, group_linears, states, calls)
        for name, module in group_linears.items():
            if accumulators[name].n_samples == 0:
                warnings.warn(f"{name}: no calibration activations reached it; GPTQ with H = 0 (same codes as RTN)")
            result = run_gptq(module.weight, accumulators[name].hessian, name=name, **options)
            results[name] = result.quantized
            module.weight.data.copy_(result.dequantized.to(module.weight.dtype))
    return results


def fake_quantize_model(model: nn.Module, results: dict[str, QuantizedLinear], inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) whose quantized Linears hold dequantized weights."""
    modules = dict(model.named_modules())
    for name, quantized in results.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: not an nn.Linear of {type(model).__name__}")
        if tuple(module.weight.shape) != (quantized.out_features, quantized.in_features):
            raise ValueError(
                f"{name}: quantized shape {(quantized.out_features, quantized.in_features)} "
                f"!= weight shape {tuple(module.weight.shape)}"
            )
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, module in target.named_modules():
            if name in results:
                module.weight.data.copy_(results[name].dequantize(module.weight.dtype))
    return target
