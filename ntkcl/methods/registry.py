"""Methods discovered through the `ntkcl.methods` entry-point group."""

from __future__ import annotations

from pydantic import ValidationError

from ntkcl._entry_points import METHODS_GROUP, Discovered, discover, require
from ntkcl.config import describe_validation_error
from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod, MethodParams

GROUP = METHODS_GROUP


def discover_methods() -> dict[str, Discovered]:
    found = discover(GROUP)
    for item in found.values():
        if item.ok and not (isinstance(item.obj, type) and issubclass(item.obj, ContinualMethod)):
            item.error = f"entry point {item.target} is not a ContinualMethod subclass"
            item.obj = None
    return found


def get_method(name: str) -> type[ContinualMethod]:
    """The method class called `name`; unknown names are a BadInputError listing the valid ones."""
    return require(discover_methods(), name, "method")


def validate_params(method: type[ContinualMethod], params: dict) -> MethodParams:
    """The method's hyper-parameters with defaults filled in; errors name `method.params.<field>`."""
    try:
        return method.Params.model_validate(params)
    except ValidationError as error:
        raise BadInputError(describe_validation_error(error, "method.params", f" for {method.name}")) from error
