"""Fakes of the far side of the network, shipped like ``treq.testing``: a Fritz!Box
simulator, a fake Zadarma API, in-memory stand-ins for the store, the logins and the
Zadarma client. Only ``dpvoip.cli`` (the simulator commands) and tests import them.
"""
