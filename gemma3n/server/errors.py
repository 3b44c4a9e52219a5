"""OpenAI-style errors: every refusal is `{"error": {"message", "type", "param", "code"}}` with a 4xx status."""
from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """A request the server refuses; the message says what was wrong and what to do instead."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def served_models(model, settings) -> list[str]:
    """The model ids a server answers to: the base, then each adapter served beside it (`--adapter NAME=DIR`)."""
    adapters = getattr(model, "adapters", None)
    return [settings.model_name, *(adapters.names if adapters is not None else ())]


def unknown_model(name: str, served: list[str]) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server serves "
                         f"{', '.join(repr(n) for n in served)}", param="model", code="model_not_found")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)
