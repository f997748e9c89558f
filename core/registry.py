"""Name -> implementation registries.

A method is a module that exposes ``Params`` (a pydantic model, the method's recipe ``params``)
and the family's entry function. Registries map the recipe's method name to a module path and
import it lazily, so a stage image never imports the dependencies of methods it does not run.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from pqflow.errors import RecipeError


class MethodRegistry:
    """Maps method names of one family (importance, prune, quantize, ...) to modules."""

    def __init__(self, family: str, modules: dict[str, str]) -> None:
        self.family = family
        self._modules = dict(modules)

    def names(self) -> list[str]:
        return sorted(self._modules)

    def register(self, name: str, module: str) -> None:
        self._modules[name] = module

    def module(self, name: str) -> ModuleType:
        if name not in self._modules:
            close = difflib.get_close_matches(name, self._modules, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(
                f"unknown {self.family} method '{name}'{hint}; available: {', '.join(self.names())}"
            )
        return importlib.import_module(self._modules[name])

    def params(self, name: str, raw: dict[str, Any] | None) -> BaseModel:
        """Validate ``raw`` against the method's ``Params`` model."""
        mod = self.module(name)
        model: type[BaseModel] | None = getattr(mod, "Params", None)
        if model is None:
            if raw:
                raise RecipeError(f"{self.family} method '{name}' takes no params, got {sorted(raw)}")
            return BaseModel()
        return model.model_validate(raw or {})
