"""A Fritz!Box: its CallMonitor lines parsed, its calls tracked (pure), and the service
that keeps one connection per box (the wire itself is in ``dpvoip.protocols``).
"""
