"""``v2g web``: a live view of the fleet in a browser, read off the broker like any
operator client (``view`` holds what the page shows, ``app`` serves it, ``serve`` runs it)."""
