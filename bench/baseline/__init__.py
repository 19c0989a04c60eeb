"""MegaFlow against a monolithic single-service baseline (issue 5, item 8).

`scenario` holds the shared assumptions (the simulated GPU, environment latencies,
injected faults, the node) and each side's measured path to its sandboxes; `sides`
runs one concurrency level of either system; `report`, `costs` and `markdown` decide
what is sustainable and write the tables, the plots and the markdown; `exec_cost`
measures how much of `docker exec` / `docker run` / SWE-ReX time is CPU. The entry
point is `bench.baseline_bench.run`.
"""
