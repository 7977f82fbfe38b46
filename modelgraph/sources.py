"""Turn a model spec string into a module and example inputs.

Specs: ``torchvision:NAME`` (default random init, or a local state dict) and
``package.module:factory`` (a callable returning a module, or a (module, example_inputs) pair).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modelgraph.errors import ModelSourceError
from modelgraph.tv_compat import import_torchvision

log = logging.getLogger(__name__)

# torchvision builders need a few arguments to be exportable or cheap: aux heads only run in training.
_TV_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_TV_INPUT = {"inception_v3": (1, 3, 299, 299)}
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    spec: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def name(self) -> str:
        return self.spec.split(":", 1)[-1]


def load_model(spec: str, *, weights: str | Path | None = None, input_shape: tuple[int, ...] | None = None,
               seed: int = 0) -> LoadedModel:
    """Build the model a spec names (eval mode) with example inputs of ``input_shape``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSourceError(f"model spec {spec!r} must be 'torchvision:NAME' or 'package.module:factory'")
    kind, _, name = spec.partition(":")
    torch.manual_seed(seed)
    if kind == "torchvision":
        module, shape = _torchvision(name), _TV_INPUT.get(name, DEFAULT_INPUT_SHAPE)
        inputs = None
    else:
        module, inputs = _factory(kind, name)
        shape = DEFAULT_INPUT_SHAPE
    if weights is not None:
        _load_weights(module, Path(weights))
    module.eval()
    if inputs is None:
        inputs = (torch.randn(*(input_shape or shape)),)
    elif input_shape is not None:
        inputs = (torch.randn(*input_shape),)
    return LoadedModel(spec, module, tuple(inputs))


def _torchvision(name: str) -> torch.nn.Module:
    tv = import_torchvision()
    available = set(tv.models.list_models(module=tv.models))
    if name not in available:
        near = sorted(n for n in available if name.lower()[:4] in n)[:6]
        hint = f" Did you mean: {', '.join(near)}?" if near else " See torchvision.models.list_models()."
        raise ModelSourceError(f"unknown torchvision model {name!r}.{hint}")
    try:
        return tv.models.get_model(name, weights=None, **_TV_KWARGS.get(name, {}))
    except Exception as e:
        raise ModelSourceError(f"building torchvision:{name} failed: {type(e).__name__}: {e}") from e


def _factory(module_path: str, attr: str) -> tuple[torch.nn.Module, tuple | None]:
    try:
        mod = importlib.import_module(module_path)
    except ImportError as e:
        raise ModelSourceError(f"cannot import {module_path!r} ({e}); is it on PYTHONPATH?") from e
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelSourceError(f"{module_path!r} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as e:
        raise ModelSourceError(f"factory {module_path}:{attr} raised {type(e).__name__}: {e}") from e
    inputs = None
    if isinstance(made, tuple) and len(made) == 2:
        made, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise ModelSourceError(f"factory {module_path}:{attr} returned {type(made).__name__}, not an nn.Module "
                               "(or a (module, example_inputs) pair)")
    return made, inputs


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a local state dict (the user's own file, on the device; weights_only: no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelSourceError(f"weights file {str(path)!r} does not exist") from None
    except Exception as e:
        raise ModelSourceError(f"cannot read weights file {str(path)!r}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}. Expected a state dict "
                               "saved with torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSourceError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelSourceError(f"weights file {str(path)!r} does not fit the model: "
                               f"{str(e).splitlines()[0][:300]}") from None
