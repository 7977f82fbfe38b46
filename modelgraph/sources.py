"""Turn a model spec string into a module and example inputs.

Specs: ``torchvision:NAME`` (default random init, or a local state dict) and
``package.module:factory`` (a callable returning a module, a (module, example_inputs) pair, or a
(module, example_inputs, example_kwargs) triple for a forward with keyword inputs).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelgraph.errors import ModelSourceError
from modelgraph.tv_compat import import_torchvision

log = logging.getLogger(__name__)

# torchvision builders need a few arguments to be exportable or cheap: aux heads only run in training.
_TV_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "quantized_googlenet": {"aux_logits": False, "init_weights": True},
    "quantized_inception_v3": {"aux_logits": False, "init_weights": True},
}
_TV_INPUT = {"inception_v3": (1, 3, 299, 299), "quantized_inception_v3": (1, 3, 299, 299),
             "mvit_v1_b": (1, 3, 16, 224, 224), "mvit_v2_s": (1, 3, 16, 224, 224), "s3d": (1, 3, 16, 224, 224)}
_FAMILY_INPUT = {"video": (1, 3, 16, 112, 112), "optical_flow": (1, 3, 128, 128), "detection": (3, 320, 320)}
_FAMILIES = ("segmentation", "detection", "video", "optical_flow", "quantization")
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    spec: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    default_example: bool = False
    """True when the factory returned a module alone and ``example_inputs`` is the default image
    (``DEFAULT_INPUT_SHAPE``): a capture that fails on it says so (``with_example_hint``)."""
    example_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of ``forward`` to capture with (a factory's ``(module, args, kwargs)``; session 18)."""

    @property
    def name(self) -> str:
        return self.spec.split(":", 1)[-1]

    def with_example_hint(self, error: Exception) -> str:
        """``error``'s text, plus what the example was when it was the default one (a factory returning a module
        alone was captured on a 1x3x224x224 image and failed with e.g. "a and b must have same reduction dim",
        naming neither the example nor the fix; session 16)."""
        if not self.default_example:
            return str(error)
        shape = "x".join(map(str, DEFAULT_INPUT_SHAPE))
        return (f"{error} (the factory {self.spec} returned a module without example inputs, so it was tried on "
                f"one random {shape} float32 image: return (module, example_inputs) from the factory or give "
                "--input-shape)")


def with_given_hint(error: Exception, given: str = "the example inputs given") -> str:
    """``error``'s text, plus a question about the inputs given when torch.export's own error is all it says
    (newuser32: ``--input-shape 1,17`` for a ``Linear(16, ..)`` sent the user to torch.export's documentation
    about "a and b must have same reduction dim")."""
    text = str(error)
    if text.startswith("torch.export could not capture"):
        text += f" (captured on {given}: do they fit the model?)"
    return text


def load_model(spec: str, *, weights: str | Path | None = None, input_shape: tuple[int, ...] | None = None,
               seed: int = 0) -> LoadedModel:
    """Build the model a spec names (eval mode) with example inputs of ``input_shape``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSourceError(f"model spec {spec!r} must be 'torchvision:NAME' or 'package.module:factory'")
    kind, _, name = spec.partition(":")
    torch.manual_seed(seed)
    if kind == "torchvision":
        module, family = _torchvision(name)
        shape = input_shape or _TV_INPUT.get(name) or _FAMILY_INPUT.get(family, DEFAULT_INPUT_SHAPE)
        inputs = _tv_inputs(family, shape)
    else:
        module, inputs, kwargs = _factory(kind, name)
        default = inputs is None and input_shape is None
        if inputs is None or input_shape is not None:
            inputs = (torch.randn(*(input_shape or DEFAULT_INPUT_SHAPE)),)
    if weights is not None:
        _load_weights(module, Path(weights))
    module.eval()
    return LoadedModel(spec, module, tuple(inputs), default_example=kind != "torchvision" and default,
                       example_kwargs=kwargs if kind != "torchvision" else {})


def torchvision_family(name: str) -> str:
    """``classification``, ``segmentation``, ``detection``, ``video``, ``optical_flow`` or ``quantization``."""
    tv = import_torchvision()
    for fam in _FAMILIES:
        if name in tv.models.list_models(module=getattr(tv.models, fam)):
            return fam
    return "classification"


def torchvision_names() -> list[str]:
    """Every name ``torchvision.models.list_models()`` returns (all families)."""
    return sorted(import_torchvision().models.list_models())


def _tv_inputs(family: str, shape: tuple[int, ...]) -> tuple:
    if family == "detection":  # forward(images: list of CHW tensors)
        return ([torch.rand(*shape[-3:])],)
    if family == "optical_flow":  # forward(image1, image2)
        return (torch.randn(*shape), torch.randn(*shape))
    return (torch.randn(*shape),)


def _torchvision(name: str) -> tuple[torch.nn.Module, str]:
    """Build torchvision model ``name`` with random weights and no backbone weights (nothing downloads)."""
    tv = import_torchvision()
    available = set(tv.models.list_models())
    if name not in available:
        near = difflib.get_close_matches(name.lower(), sorted(available), n=6, cutoff=0.6) or \
            sorted(n for n in available if name.lower()[:4] in n)[:6]
        hint = f" Did you mean: {', '.join(near)}?" if near else " See torchvision.models.list_models()."
        raise ModelSourceError(f"unknown torchvision model {name!r}.{hint}")
    family = torchvision_family(name)
    kwargs: dict = {"weights": None, **_TV_KWARGS.get(name, {})}
    if family in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    try:
        return tv.models.get_model(name, **kwargs), family
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ModelSourceError(f"building torchvision:{name} failed: {type(e).__name__}: {first}") from e


def _import_user_module(module_path: str):
    """Import ``module_path``; where it (or its top package) is not on ``sys.path``, look in the current
    directory too, appended after everything else (an installed package of the same name still wins), as
    ``python -m`` and most ``module:attr`` loaders do: ``coinfer-ue run --model mymodels:net`` from the folder
    that holds ``mymodels.py`` (a console script's ``sys.path`` has no current directory; session 15 found the
    README's ``--model tests.user_zoo:NAME`` failing from a fresh clone)."""
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        top = module_path.split(".")[0]
        cwd = os.getcwd()
        if e.name != top or cwd in sys.path or "" in sys.path or "." in sys.path \
                or not (Path(cwd, top + ".py").is_file() or Path(cwd, top).is_dir()):
            raise
    sys.path.append(cwd)
    return importlib.import_module(module_path)


def _factory(module_path: str, attr: str) -> tuple[torch.nn.Module, tuple | None, dict]:
    """(module, example args or None, example kwargs) a ``module:factory`` spec's factory returns: a module, a
    ``(module, example_inputs)`` pair or a ``(module, example_inputs, example_kwargs)`` triple (session 18: the
    triple, what a forward with keyword inputs needs, was refused as "returned tuple, not an nn.Module")."""
    if module_path.endswith(".py") or "/" in module_path or "\\" in module_path:
        # newuser32: `--model ./mymodels.py:net` said "TypeError: the 'package' argument is required to perform a
        # relative import for './mymodels.py'"
        name = Path(module_path).stem
        raise ModelSourceError(f"model spec {module_path}:{attr} names a file: give its module name, "
                               f"{name}:{attr}, from the folder that holds {name}.py or with that folder on "
                               "PYTHONPATH")
    try:
        mod = _import_user_module(module_path)
    except ModuleNotFoundError as e:
        if e.name and (module_path == e.name or module_path.startswith(e.name + ".")):
            raise ModelSourceError(f"cannot import {module_path!r}: no such module on PYTHONPATH or in the current "
                                   f"directory ({os.getcwd()})") from e
        raise ModelSourceError(f"cannot import model module {module_path!r}: {_first_line(e)}") from e
    except Exception as e:  # anything the user's module raises at import time
        raise ModelSourceError(f"cannot import model module {module_path!r}: {_first_line(e)}") from e
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelSourceError(f"{module_path!r} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as e:
        raise ModelSourceError(f"factory {module_path}:{attr} raised {_first_line(e)}") from e
    inputs, kwargs = None, {}
    if isinstance(made, tuple) and len(made) == 3 and isinstance(made[2], Mapping | None):
        made, inputs, kwargs = made
        kwargs = dict(kwargs or {})
    elif isinstance(made, tuple) and len(made) == 2:
        made, inputs = made
    if inputs is not None:
        inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    if not isinstance(made, torch.nn.Module):
        raise ModelSourceError(f"factory {module_path}:{attr} returned {type(made).__name__}, not an nn.Module "
                               "(or a (module, example_inputs) pair, or a (module, example_inputs, example_kwargs) "
                               "triple)")
    return made, inputs, kwargs


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
    state = _unwrap_state(state)
    if not isinstance(state, dict):
        raise ModelSourceError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    own = module.state_dict()
    if not any(k in own for k in state) and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(v.shape)} (model {list(own[k].shape)})" for k, v in state.items()
                 if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if keys:
                more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:10])}{more}")
        raise ModelSourceError(f"weights file {str(path)!r} does not fit {type(module).__name__}: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelSourceError(f"weights file {str(path)!r} does not fit the model: {_first_line(e)}") from None


def _unwrap_state(state: object) -> object:
    """A training checkpoint's ``{"model": sd}`` / ``{"state_dict": sd}`` (also nested once) -> ``sd``."""
    for _ in range(2):
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in ("state_dict", "model", "model_state_dict", "module")
                          if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
