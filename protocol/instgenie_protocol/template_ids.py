"""The template-id form on the wire: the engine's own definition (that module imports no torch)."""

from instgenie.template_ids import check_template_id, is_template_id

__all__ = ["check_template_id", "is_template_id"]
