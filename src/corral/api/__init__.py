"""The REST API: FastAPI app over the manager, bearer-token auth, the console proxy, and
serving on a unix socket and TCP. Imports ``manager`` and ``spec``."""

from corral.api.app import create_app
from corral.api.server import ApiOptions, api_service

__all__ = ["ApiOptions", "api_service", "create_app"]
