"""MegaFlow against a monolithic single-service baseline (issue 5, item 8).

`scenario` holds the shared assumptions (the simulated GPU, environment latencies,
injected faults, the node); `sides` runs one concurrency level of either system;
`report` decides what is sustainable and writes the table, the plots and the markdown.
The entry point is `bench.baseline_bench.run`.
"""
