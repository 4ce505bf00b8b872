"""The server side, independent of any runtime: :class:`~fedfm.server.server.Server` and what it is built from."""
