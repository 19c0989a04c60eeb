"""Deployment shapes: everything in one process (`embedded`), or one service per
process over gRPC (`processes`). The same services run in both."""
