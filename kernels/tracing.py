"""torch.fx symbolic tracing of the op's arguments (layouts and modifiers).

Under `torch.fx` symbolic tracing the op is one `call_function` node (kernels/op.py). A layout or
modifier among its arguments enters the graph in one of two ways:

- built from real tensors and numbers: a constant attribute of the traced module (`get_attr`);
- built from traced values (a parameter's proxy, a traced shape, indices computed from an
  activation): construction is deferred. The object keeps its constructor arguments and skips
  its validation; in the graph it becomes a `call_function` node that calls its class with those
  arguments, so the traced module builds, and validates, the real object on every call. Model
  code can therefore build a `GaussianMixture`, `TalkingHeads` or a layout inside `forward` from
  its parameters and call the op directly: no fx-leaf wrapper is needed.

`Layout` and `Modifier` get this in one place: `__init_subclass__` wraps each subclass `__init__`
with `defer_under_fx`. Eager code, torch.compile and torch.export never see a deferred object:
only torch.fx symbolic tracing passes `torch.fx.Proxy` values.
"""
from __future__ import annotations

import functools

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ["defer_under_fx", "find_tracer", "fx_create_arg"]

# instance attribute of a deferred object: (tracer, class, args, kwargs)
_DEFERRED = "_fx_deferred"
# deferred object: (tracer, node) of the graph node already emitted for it (one node per object)
_NODE = "_fx_node"


def find_tracer(obj):
    """The torch.fx tracer of the first `Proxy` or deferred object in `obj` (nested tuples, lists
    and dict values included), or None."""
    if isinstance(obj, torch.fx.Proxy):
        return obj.tracer
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = find_tracer(o)
            if t is not None:
                return t
    elif isinstance(obj, dict):
        return find_tracer(tuple(obj.values()))
    else:
        d = getattr(obj, "__dict__", None)
        if d is not None and _DEFERRED in d:
            return d[_DEFERRED][0]
    return None


def defer_under_fx(init):
    """Wrap a layout / modifier `__init__`: while torch.fx symbolically traces and some argument is
    a traced value, only record the arguments (see the module docstring); otherwise run `init`."""
    if getattr(init, "_zoo_defers", False):
        return init

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if is_fx_symbolic_tracing():
            tracer = find_tracer((args, kwargs))
            if tracer is not None:
                self.__dict__[_DEFERRED] = (tracer, type(self), args, kwargs)
                return
        init(self, *args, **kwargs)

    __init__._zoo_defers = True
    return __init__


def fx_create_arg(obj, tracer):
    """`__fx_create_arg__` of layouts and modifiers: a `call_function` node rebuilding a deferred
    object from its traced arguments, else a `get_attr` node of the object as a constant."""
    d = obj.__dict__
    deferred = d.get(_DEFERRED)
    if deferred is None:
        name = tracer.get_fresh_qualname("_zoo_kernels_arg_")
        setattr(tracer.root, name, obj)
        return tracer.create_node("get_attr", name, (), {})
    owner, cls, args, kwargs = deferred
    if owner is not tracer:
        raise RuntimeError(f"{cls.__name__} was built from values of another torch.fx trace; build it "
                           "inside the traced forward")
    seen = d.get(_NODE)
    if seen is None:
        seen = d[_NODE] = tracer.create_proxy("call_function", cls, tuple(args), dict(kwargs)).node
    return seen
