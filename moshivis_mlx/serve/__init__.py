"""The server mode (`moshivis-mlx --serve`): the model over Kyutai's websocket protocol,
to Kyutai's clients and to our web page (docs/SERVE.md)."""
