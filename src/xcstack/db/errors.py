"""How driver failures become client errors (stable codes; never SQL, never driver text for 5xx)."""

from __future__ import annotations

from xcstack.db.profiles import ErrorKind
from xcstack.db.protocol import DbCode
from xcstack.errors import BadRequest, Conflict, GatewayTimeout, NotFound, Overloaded, XCError


class DbError(XCError):
    status = 500
    type = "server_error"
    code = DbCode.DB_ERROR


def unknown_database(name: str) -> NotFound:
    return NotFound(f"no database named {name!r}", code=DbCode.UNKNOWN_DATABASE)


def unknown_query(database: str, name: str) -> NotFound:
    return NotFound(f"database {database!r} has no query named {name!r}", code=DbCode.UNKNOWN_QUERY)


def pool_exhausted(database: str, waited: float, retry_after: float) -> Overloaded:
    return Overloaded(
        f"database {database!r}: no free connection within {waited:.3g}s", code=DbCode.DB_POOL_EXHAUSTED,
        retry_after=retry_after,
    )


def unavailable(database: str, retry_after: float) -> Overloaded:
    return Overloaded(
        f"database {database!r} is unavailable (no live connection; reconnecting)", code=DbCode.DB_UNAVAILABLE,
        retry_after=retry_after,
    )


def query_timeout(database: str, query: str, timeout: float) -> GatewayTimeout:
    return GatewayTimeout(
        f"query {database}/{query} did not finish within {timeout:.3g}s; it was cancelled", code=DbCode.QUERY_TIMEOUT
    )


def from_driver(kind: ErrorKind, database: str, query: str, exc: BaseException) -> XCError:
    """Map a classified driver error. Constraint and data messages name the problem, not the SQL."""
    where = f"{database}/{query}"
    if kind is ErrorKind.CONNECTION_LOST:
        return Overloaded(
            f"query {where}: the database connection was lost; retry the request", code=DbCode.DB_CONNECTION_LOST,
            retry_after=1,
        )
    if kind is ErrorKind.TIMEOUT:
        return GatewayTimeout(f"query {where} was cancelled or timed out in the database", code=DbCode.QUERY_TIMEOUT)
    if kind is ErrorKind.CONSTRAINT:
        return Conflict(f"query {where} violates a constraint: {_first_line(exc)}", code=DbCode.CONSTRAINT_VIOLATION)
    if kind is ErrorKind.DATA:
        return BadRequest(f"query {where}: a parameter value was rejected by the database: {_first_line(exc)}",
                          code=DbCode.INVALID_PARAMETER_VALUE)
    if kind is ErrorKind.CONFLICT:
        return Overloaded(f"query {where}: transaction conflict (deadlock or serialization); retry",
                          code=DbCode.DB_CONFLICT, retry_after=1)
    if kind is ErrorKind.SYNTAX:
        return DbError(f"query {where} is not valid for this database (see the server log)", code=DbCode.QUERY_INVALID)
    return DbError(f"query {where} failed in the database (see the server log)", code=DbCode.DB_ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:300]
