"""Durable state: the task ledger.

`TaskLedger` is the interface; `SqliteLedger` the embedded default. Redis and etcd
ledgers implement the same interface in later work.
"""

from megaflow.store.ledger import LedgerRow, TaskLedger
from megaflow.store.sqlite import SqliteLedger

__all__ = ["LedgerRow", "SqliteLedger", "TaskLedger"]
