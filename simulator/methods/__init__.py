"""Speculation methods (execution models). Each module in this package registers one method with
``@register_method``; all are imported here so the registry is complete."""

import importlib
import pkgutil

from simspec.simulator.methods.base import METHODS, BatchStep, Method, StepOutcome, get_method_class, register_method

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "BatchStep", "Method", "StepOutcome", "get_method_class", "register_method"]
