"""MegaFlow under other harnesses: servers and adapters that speak their protocols."""
