"""The thin API: schemas, transports and clients shared by the widgets and plain notebook code."""

from .client import AsyncClient, Client
from .handlers import Service
from .transports import ROUTES, InProcessTransport

__all__ = ["AsyncClient", "Client", "InProcessTransport", "ROUTES", "Service"]
