"""Features taken from any Flax Linen model by module path, without changing the model: what mmrazor's recorders
do for PyTorch models.

A feature is named by the path of the module that makes it, '/'-joined as Flax names submodules
(`backbone/layer4.1`, `neck/fpn_convs.2`, `encoder/stages/3`), optionally with

- `:input` (the module's first positional argument) or `:output` (the default: what its `__call__` returns);
- shell wildcards (`*/layer4.1`, `neck/fpn_convs.?`), which must match exactly one module;
- `#i` for the i-th call of a module called more than once (a head shared by pyramid levels), from 0.

    model = Recorded(make_model("fcn", backbone="resnet18_v1c_d8", num_classes=7), ["backbone/layer4.1"])
    out = model.apply(variables, images, train=False)
    out["backbone/layer4.1"]                              # (B, h, w, C), beside the model's own outputs

`Recorded` keeps the model's variables, `init` and `apply` as they are and adds the recorded features to its
outputs under their names. Inside `apply` a method interceptor (`nn.intercept_methods`) sows each chosen module's
input or output into a collection of its own, so only the named features are kept (the rest of the forward pass
stays free for XLA to discard), and it works under `jit`, sharding, bfloat16, `nn.remat` and gradients (a
student's loss on a recorded feature reaches the parameters that made it). A path that names no module is a
one-line error listing the nearest paths the model has.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.linen as nn
import jax

COLLECTION = "recorded"  # the variable collection recorded features are sown into during `apply`
_SPEC = re.compile(r"^(?P<path>[^:#]+?)(?:#(?P<call>\d+))?(?::(?P<kind>input|output))?$")


def is_module_path(name: str) -> bool:
    """Whether a feature name is a module path (it has a '/', a ':input' / ':output' or a wildcard) rather than
    the key of a model's output dict."""
    return "/" in name or name.endswith((":input", ":output")) or any(c in name for c in "*?[")


@dataclasses.dataclass(frozen=True)
class FeaturePath:
    """A parsed feature name: module `pattern`, `kind` ('output' or 'input'), `call` (None: the only call)."""

    name: str
    pattern: str
    kind: str = "output"
    call: Optional[int] = None

    @classmethod
    def parse(cls, name: str) -> FeaturePath:
        m = _SPEC.match(name.strip())
        if not m:
            raise ValueError(f"feature {name!r} is not a module path: write 'a/b/c', optionally with '#i' for "
                             "the i-th call and ':input' or ':output'")
        call = m.group("call")
        return cls(name, m.group("path").strip("/"), m.group("kind") or "output", None if call is None else int(call))

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""


class _Interceptor:
    """Calls of bound modules' `__call__`: their paths in call order, and what `take(path, kind, value)` asks for."""

    def __init__(self, take: Optional[Callable[[nn.Module, str, str, Any], None]] = None):
        self.calls: list[str] = []
        self._take = take

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__" or context.module.scope is None:
            return next_fun(*args, **kwargs)
        path = _path(context.module)
        self.calls.append(path)
        if self._take is not None and args:
            self._take(context.module, path, "input", args[0])
        out = next_fun(*args, **kwargs)
        if self._take is not None:
            self._take(context.module, path, "output", out)
        return out


def module_paths(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> list[str]:
    """The paths of every module `model.apply(variables, *args, **kwargs)` calls, in call order (repeats kept),
    traced abstractly (nothing is computed)."""
    seen = _Interceptor()

    def run(v, *a):
        with nn.intercept_methods(seen):
            return model.apply(v, *a, **kwargs)

    jax.eval_shape(run, variables, *args)
    return seen.calls


def resolve(features: Iterable[FeaturePath], calls: Sequence[str]) -> dict[str, tuple[str, int]]:
    """name -> (module path, call index) for each feature, from the module calls of one forward pass; a pattern
    that matches no module, several modules, or a module called several times without '#i' is a `ValueError`
    that names the nearest paths (or the matches)."""
    paths = list(dict.fromkeys(calls))
    counts = {p: calls.count(p) for p in paths}
    out = {}
    for f in features:
        hits = [p for p in paths if f.matches(p)]
        if not hits:
            near = difflib.get_close_matches(f.pattern, paths, n=5, cutoff=0.4) or \
                [p for p in paths if p.split("/")[0] == f.pattern.split("/")[0]][:5] or paths[:5]
            raise ValueError(f"feature {f.name!r}: the model has no module {f.pattern!r}; nearest: {', '.join(near)}")
        if len(hits) > 1:
            raise ValueError(f"feature {f.name!r}: {f.pattern!r} matches {len(hits)} modules "
                             f"({', '.join(hits[:6])}{', ...' if len(hits) > 6 else ''}); name one")
        [path] = hits
        if f.call is None and counts[path] > 1:
            raise ValueError(f"feature {f.name!r}: module {path!r} is called {counts[path]} times in one forward "
                             f"pass; name a call, e.g. '{path}#0'")
        call = f.call or 0
        if call >= counts[path]:
            raise ValueError(f"feature {f.name!r}: module {path!r} is called {counts[path]} time(s); "
                             f"'#{call}' is out of range")
        out[f.name] = (path, call)
    return out


class Recorded:
    """`model` with features taken by module path (module docstring), added to its output dict.

    The same variables, `init` and `apply` as `model` (the model's other attributes pass through, so a detector's
    task and freezing rules see it unchanged). `apply` returns the model's output dict, or `{'output': out}` for a
    model returning something else, with each recorded feature under its name.
    """

    def __init__(self, model: nn.Module, features: Sequence[str]):
        self.model = model
        if isinstance(features, str):  # else read letter by letter, each letter a 'path'
            raise TypeError(f"Recorded: features must be a list of paths, got the string {features!r} "
                            f"(one feature: [{features!r}])")
        self.features = tuple(FeaturePath.parse(f) for f in dict.fromkeys(features))
        self._resolved: dict[str, dict[str, tuple[str, int]]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"Recorded({type(self.model).__name__}, {[f.name for f in self.features]})"

    def check(self, sample: Any) -> None:
        """Resolve every feature on an abstract inference pass over `sample` (nothing computed), so a wrong path
        fails when a run is built rather than when its step is first traced."""
        variables = jax.eval_shape(lambda: self.model.init(jax.random.key(0), sample, train=False))
        self._where(variables, (sample,), {"train": False})

    def init(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.init(*args, **kwargs)

    def _where(self, variables: Any, args: tuple, kwargs: dict) -> dict[str, tuple[str, int]]:
        # Which modules run can depend on the call's options (train) and shapes, not on array values.
        key = repr(jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else a,
                                (args, {k: v for k, v in kwargs.items() if k not in ("rngs", "mutable")})))
        if key not in self._resolved:
            calls = module_paths(self.model, variables, *args, **kwargs)
            self._resolved[key] = resolve(self.features, calls)
        return self._resolved[key]

    def apply(self, variables: Any, *args: Any, mutable: Any = False, **kwargs: Any) -> Any:
        where = self._where(variables, args, {**kwargs, "mutable": mutable})
        wanted = {(path, kind) for (path, _), kind in
                  zip(where.values(), (f.kind for f in self.features))}

        def take(module: nn.Module, path: str, kind: str, value: Any) -> None:
            if (path, kind) in wanted:
                module.sow(COLLECTION, kind, value)

        if mutable is True:
            collections = True
        else:
            collections = [*([mutable] if isinstance(mutable, str) else list(mutable or ())), COLLECTION]
        with nn.intercept_methods(_Interceptor(take)):
            out, updates = self.model.apply(variables, *args, mutable=collections, **kwargs)
        updates = dict(updates)
        sown = updates.pop(COLLECTION, {})
        out = dict(out) if isinstance(out, dict) else {"output": out}
        for f in self.features:
            path, call = where[f.name]
            node = sown
            for part in path.split("/") if path else []:
                node = node[part]
            value = node[f.kind][call]
            if not isinstance(value, jax.Array):
                raise ValueError(f"feature {f.name!r}: module {path!r} {'returns' if f.kind == 'output' else 'takes'} "
                                 f"a {type(value).__name__}, not an array; record one of its submodules")
            out[f.name] = value
        return (out, updates) if mutable else out


def unwrap(model: Any) -> Any:
    """The model inside a `Recorded` (the model itself otherwise): what evaluation and export use."""
    return model.model if isinstance(model, Recorded) else model


def with_recorded(model: Any, names: Iterable[str]) -> Any:
    """`model` wrapped in a `Recorded` for those of `names` that are module paths (unchanged if none is)."""
    if isinstance(names, str):
        raise TypeError(f"with_recorded: names must be a list of feature names, got the string {names!r} "
                        f"(one feature: [{names!r}])")
    paths = [n for n in names if is_module_path(n)]
    return Recorded(model, paths) if paths and model is not None else model


def check_recorded(model: Any, sample: Any) -> None:
    """`Recorded.check` for a wrapped model; nothing for another."""
    if isinstance(model, Recorded):
        model.check(sample)
