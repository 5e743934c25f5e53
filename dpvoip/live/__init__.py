"""Live events: every change of a call and of a box, published from its transaction,
fanned out to the browsers watching ``GET /voip/events`` (behaviour.md section 8)."""
