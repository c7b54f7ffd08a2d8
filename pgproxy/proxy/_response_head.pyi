"""Types of the C module pgproxy/proxy/_response_head.c, for mypy and mypyc."""

def read_head(
    data: bytes,
    max_head: int,
    head_request: bool,
    connection_tokens: dict[bytes, frozenset[bytes]],
    /,
) -> (
    tuple[
        int,
        int | None,
        frozenset[bytes] | None,
        list[bytes],
        list[bytes] | None,
        bytes,
        int,
    ]
    | None
): ...
