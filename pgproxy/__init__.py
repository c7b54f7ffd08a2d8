"""pgproxy: a declarative HTTP/1.1 load balancer and reverse proxy."""

from pgproxy.compiled import choose_modules

__version__ = "0.1.0.dev0"

# Before any compiled module is imported, as pgproxy/compiled.py explains.
choose_modules()
