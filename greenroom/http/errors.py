"""OpenAI error objects and the status code of each greenroom error kind."""

from __future__ import annotations

from greenroom.client import GreenroomError

# error kind -> (HTTP status, OpenAI error type)
_STATUS: dict[str, tuple[int, str]] = {
    "invalid": (400, "invalid_request_error"),
    "malformed": (400, "invalid_request_error"),
    "unavailable": (503, "service_unavailable"),
    "overloaded": (503, "service_unavailable"),
    "timeout": (504, "timeout"),
    "failed": (500, "internal_error"),
    "aborted": (500, "internal_error"),
}


class ApiError(Exception):
    """An error answered as an OpenAI error object with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def from_greenroom(exc: GreenroomError) -> ApiError:
    status, type_ = _STATUS.get(exc.kind, (500, "internal_error"))
    return ApiError(status, str(exc), type_)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable")
