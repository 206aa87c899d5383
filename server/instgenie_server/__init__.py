"""InstGenIE serving: the Triton Inference Server launcher lives in :mod:`instgenie_server.launcher`.

Kept empty on purpose: ``python -m instgenie_server.launcher`` would otherwise import the
launcher twice (once as a package member, once as ``__main__``).
"""
