"""A Jepsen-style nemesis for real `vaultnode` processes (docs/nemesis.md)."""
