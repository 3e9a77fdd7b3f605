"""The HTTP API's handlers, one module per resource; vaultnode/api.py dispatches to them."""
