"""pgproxy: a declarative HTTP/1.1 load balancer and reverse proxy."""

__version__ = "0.1.0.dev0"
