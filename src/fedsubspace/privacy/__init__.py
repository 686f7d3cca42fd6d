"""Privacy mechanisms: DP-SGD on clients, client-level DP on the server, SecAgg+ on Flower."""
