"""Errors the job layer raises for the API to translate. `code` is the public error code."""


class ServiceError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, **extensions) -> None:
        super().__init__(message)
        self.message = message
        self.extensions = extensions


class InvalidInput(ServiceError):
    code = "BAD_USER_INPUT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class Overloaded(ServiceError):
    code = "OVERLOADED"


class RateLimited(ServiceError):
    code = "RATE_LIMITED"


class Forbidden(ServiceError):
    code = "FORBIDDEN"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"
