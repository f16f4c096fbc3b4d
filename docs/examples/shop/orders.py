"""The orders module's tasks: a router, included by the app."""

from __future__ import annotations

from qtasks import Router

router = Router()


@router.task(retry=2, description="the total of an order, in cents")
async def total(items: list[dict[str, int]]) -> int:
    return sum(item["price"] * item["qty"] for item in items)


@router.task
async def pick(items: list[dict[str, int]]):
    """Streams one line per item as it is picked."""
    for item in items:
        yield f"picked {item['qty']} x {item['sku']}"
