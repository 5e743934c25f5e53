"""The HTTP edge: the Klein app and its routes, the Site, and what a request says. Routes
translate HTTP into calls on the services the composition root hands them; they never
import ``dpvoip.store``.
"""
