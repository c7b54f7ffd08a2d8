"""The request path: downstream parsing, the exchange, upstream connections."""
