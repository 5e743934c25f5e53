"""What ``dpvoip check`` reads besides the schema and the boxes: the phone directory's size.

The daemon keeps its own count (``DirectoryIndex.state``); ``check`` is another process
and asks the database.
"""

from __future__ import annotations

from dpvoip.store.database import Store


async def directory_sizes(store: Store) -> dict[str, int]:
    """How many numbers the phone directory holds, per source (clients, contacts, ...)."""
    rows = await store.read(
        "SELECT source, count(*) FROM dpvoip.directory_entry GROUP BY source")
    return {str(source): int(count) for source, count in rows}
