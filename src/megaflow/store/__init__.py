"""Durable state: the task ledger, checkpoints and leases.

`TaskLedger` is the interface; `SqliteLedger` the embedded default, `RedisLedger`
(``megaflow.store.redis``) and `EtcdLedger` (``megaflow.store.etcd``) the distributed
ones; `open_ledger(url)` picks one from a URL. The Redis and etcd modules are imported
only when used.
"""

from megaflow.store.factory import open_ledger
from megaflow.store.ledger import Checkpoint, LedgerRow, RunRow, TaskLedger, TaskRow
from megaflow.store.sqlite import SqliteLedger

__all__ = [
    "Checkpoint",
    "LedgerRow",
    "RunRow",
    "SqliteLedger",
    "TaskLedger",
    "TaskRow",
    "open_ledger",
]
