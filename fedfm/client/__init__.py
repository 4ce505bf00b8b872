"""The client side, independent of any runtime: :class:`~fedfm.client.client.ClientApp` and its local trainers."""
