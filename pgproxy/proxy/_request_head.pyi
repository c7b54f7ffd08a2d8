"""Types of the C module pgproxy/proxy/_request_head.c, for mypy and mypyc."""

def check_head(
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    names: list[bytes] | None,
    connection_tokens: dict[bytes, frozenset[bytes]],
    /,
) -> (
    tuple[bytes, bytes, int | None, frozenset[bytes] | None, bool, bool, bool] | None
): ...
