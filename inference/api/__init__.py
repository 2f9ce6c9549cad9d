"""The friendly JSON API (`routes.py`) and its request schemas (`schemas.py`), next to KServe's v2 routes."""
