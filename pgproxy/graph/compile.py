"""Child process that loads a config file for a serving process.

    python -m pgproxy.graph.compile PATH

A serving process never imports pydantic: it runs this module to validate
the file and build the graph, and reads the result from its stdout as one
pickle, `("ok", LoadedGraph)` or `("error", [Diagnostic, ...])`. Every
outcome the file can cause is one of these two, with exit code 0; another
exit code means the loader itself failed. The pickle only ever travels
between processes of the same pgproxy installation (this child, its parent,
and the parent's workers), never from a file or the network.
"""

from __future__ import annotations

import pickle
import sys

from pgproxy.errors import ConfigError
from pgproxy.graph.load import read_config


def compile_config(path: str) -> bytes:
    """Load the config at `path` and return the pickled outcome."""
    try:
        loaded, _ = read_config(path)
    except ConfigError as error:
        return pickle.dumps(("error", list(error.diagnostics)))
    return pickle.dumps(("ok", loaded))


def main(argv: list[str]) -> int:
    """Write the pickled outcome of loading argv[0] to stdout."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m pgproxy.graph.compile PATH\n")
        return 2
    sys.stdout.buffer.write(compile_config(argv[0]))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
