"""The one exception every adapter check raises: a client error with a machine-readable reason."""

from __future__ import annotations

from engine.adapter_format import AdapterError


class AdapterRejected(Exception):
    """An uploaded adapter was refused. `code` names the reason; `param` names the form field at fault.

    The HTTP layer turns it into the error envelope with `status_code`; the validation code never
    imports the web framework, so it can be unit-tested and reused from the CLI.
    """

    def __init__(self, code: str, message: str, *, param: str = "weights", status_code: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status_code = status_code

    def __repr__(self) -> str:
        return f"AdapterRejected({self.code!r}, {self.message!r}, param={self.param!r})"


def rejected(exc: AdapterError) -> AdapterRejected:
    """The adapter-format contract's refusal (engine/adapter_format.py) as the upload's client error."""
    status = 413 if exc.code == "config_too_large" else 422
    return AdapterRejected(exc.code, f"{exc.field}: {exc}", param=exc.field, status_code=status)
