"""Wire protocols only (the Fritz!Box CallMonitor's lines): bytes in, text lines out.
"""
