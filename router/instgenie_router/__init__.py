"""The InstGenIE router: a KServe v2 endpoint that spreads edits over Triton instances.

Idea 4 of InstGenIE. ``instances`` holds what the router knows of each instance
(health, scraped load, its own bookkeeping), ``policies`` chooses one per request
(``mask_aware`` by predicted finish time), ``signals`` scrapes metrics and checks
health, ``grpc_proxy`` and ``http_proxy`` forward the KServe v2 protocol,
``openai_api`` speaks the OpenAI Images API (and feeds the browser playground in
``playground/``), ``service`` wires them into ``instgenie router``.
"""

from .instances import Instance, InstancePool, RequestCost
from .policies import POLICIES, Policy

__all__ = ["Instance", "InstancePool", "POLICIES", "Policy", "RequestCost"]
