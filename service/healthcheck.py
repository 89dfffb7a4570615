"""`python -m service.healthcheck`: exit 0 when this container's server is ready, else 1.

The images' HEALTHCHECK: it asks `/readyz` on the port the server was configured with
(ANYTIME_PORT), on loopback, so it follows the settings instead of assuming port 8000.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from service.config import ServiceSettings


def main() -> int:
    """Return 0 if GET /readyz answers 200 within 2 s."""
    port = ServiceSettings().port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
