"""Request schedulers and speculation-length policies.

Adding one is one decorated class in one new module of this package::

    @register_scheduler("my-policy")
    class MyPolicy(Scheduler): ...

Every module here is imported on package import, so the registries (and the CLI's choices) are
complete.
"""

import importlib
import pkgutil

from simspec.policies.base import (
    SCHEDULERS,
    SPEC_LEN_POLICIES,
    PolicyContext,
    Scheduler,
    SpecLenPolicy,
    StepRecord,
    WindowRecord,
    get_scheduler_class,
    get_spec_len_class,
    register_scheduler,
    register_spec_len,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["SCHEDULERS", "SPEC_LEN_POLICIES", "PolicyContext", "Scheduler", "SpecLenPolicy", "StepRecord", "WindowRecord",
           "get_scheduler_class", "get_spec_len_class", "register_scheduler", "register_spec_len"]
