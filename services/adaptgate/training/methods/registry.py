"""Every training method this server offers, by name: a new method is one module and one line here.

The names are what SubmitJob's `method` accepts (besides `auto`, see auto.py) and what job
records store, so a method keeps its name for as long as a database may hold jobs of it.
"""

from __future__ import annotations

from importlib import import_module

from adaptgate.errors import InvalidArgument
from adaptgate.training.methods.auto import AUTO
from adaptgate.training.methods.method import Method

# The modules of methods/ that define a METHOD, in the order SubmitJob's errors list them.
MODULES = ("head", "lora", "embed")

METHODS: dict[str, Method] = {
    method.name: method for method in (import_module(f"adaptgate.training.methods.{m}").METHOD for m in MODULES)
}


def choices() -> str:
    """The names SubmitJob accepts, for error messages: "'head', 'lora', 'embed' or 'auto'"."""
    names = [repr(name) for name in (*METHODS, AUTO)]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def resolve(method: str) -> str:
    """The canonical name of a submitted method ("" = auto); InvalidArgument naming the registered ones."""
    name = method.strip().lower() or AUTO
    if name == AUTO or name in METHODS:
        return name
    raise InvalidArgument(f"unknown method {method!r}; use {choices()}")


def method_named(name: str) -> Method:
    """The method a job record names; a record of a method this server no longer has fails in words."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgument(f"the job's method {name!r} is not offered by this server (it offers {choices()})") from None


def method_of(params: object) -> Method:
    """The method whose worker takes these parameters (by exact type: one method's type may extend another's)."""
    for method in METHODS.values():
        if method.params is type(params):
            return method
    raise TypeError(f"no training method takes {type(params).__name__}")
