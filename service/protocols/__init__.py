"""Protocol adapters: each parses its wire format into one request type, calls the data plane, and renders.

`classify` (the anytime API: POST /classify and relatives), `models` (health, readiness, model
descriptions, metrics), `v2_rest` and `v2_grpc` (the Open Inference Protocol, sharing `v2`), and
`routes` (the one route table, the front door, the body limit).
"""

from service.protocols import classify, models, v2_rest
from service.protocols.routes import Route

ROUTES: list[Route] = [*classify.ROUTES, *models.ROUTES, *v2_rest.ROUTES]
