"""The call pipeline's entry point: one transaction per happening or Zadarma event, in
order per call, decided by the rules in ``dpvoip.core`` and written by ``dpvoip.store``.
"""
