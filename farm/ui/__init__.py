"""`farm ui`: a web console on the farm's Python API (batches, jobs, workers), behind basic auth.

Server-rendered pages (Starlette + Jinja2); each live page fetches its changing part as JSON
every second. Outputs are read through the farm's artifact store and checked against their
records, never linked from the bucket.
"""

from farm.ui.app import create_app

__all__ = ["create_app"]
