"""The old monitor's endpoints: the CRM's ``fritz_monitor.py`` (v3.5 REST, v4 webhook)
pointed at dpvoip, feeding the same durable ingest as dpvoip's own Fritz!Box connections.
"""
