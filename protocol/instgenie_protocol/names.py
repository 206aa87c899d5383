"""Models and tensors of the ``instgenie_edit`` Triton model.

One request is one job. All tensors are one-element (``dims: [1]``, no batch
dimension); every input but the ones an action needs is optional.

Inputs
  ``ACTION``          BYTES  ``edit`` (default) | ``register`` | ``list``
  ``TEMPLATE_ID``     BYTES  a registered template (edit)
  ``IMAGE``           BYTES  PNG/JPEG bytes, or their base64 text: the template to
                             register, or a raw image to edit (in full, or against the
                             template it became: instgenie.auto_register)
  ``MASK``            BYTES  PNG mask, white = edit (required for edit; optional
                             template region for register); raw or base64
  ``PROMPT``          BYTES  UTF-8 text (required for edit and register)
  ``SEED``            INT64  noise seed (default: the template's, else 0)
  ``STEPS``           INT32  denoising steps (default: the template's, else the model's)
  ``GUIDANCE``        FP32   guidance scale (default: the template's, else the model's)
  ``FULL_COMPUTE``    BOOL   compute every token (no cache use); for comparisons
  ``PROGRESS``        BOOL   stream one response per denoising step
  ``OUTPUT_ENCODING`` BYTES  ``binary`` (default) | ``base64``: how ``EDITED_IMAGE`` is
                             encoded (base64 for SSE/JSON clients)

Outputs
  progress responses: ``STEP``, ``TOTAL_STEPS``, ``REQUEST_ID``
  final response:     ``EDITED_IMAGE`` (PNG; absent for register/list), ``TEMPLATE``
                      (template id edited or registered), ``TEMPLATES`` (list, ``[-1]``),
                      ``STEP``/``TOTAL_STEPS``, ``COMPUTED_TOKENS``, ``NUM_TOKENS``,
                      ``REQUEST_ID``, ``TIMELINE`` (JSON: seconds per phase of the
                      request in the step loop: prepare, admission, steps, finish)
  errors:             a Triton error response whose message reads
                      ``[request <id>] <reason>: <what to change>`` (:mod:`.errors`)
"""

from __future__ import annotations

EDIT_MODEL = "instgenie_edit"
SYNC_MODEL = "instgenie_edit_sync"
BASELINE_MODEL = "diffusers_baseline"

ACTIONS = ("edit", "register", "list")

# name -> Triton datatype
INPUTS: dict[str, str] = {
    "ACTION": "BYTES",
    "TEMPLATE_ID": "BYTES",
    "IMAGE": "BYTES",
    "MASK": "BYTES",
    "PROMPT": "BYTES",
    "SEED": "INT64",
    "STEPS": "INT32",
    "GUIDANCE": "FP32",
    "FULL_COMPUTE": "BOOL",
    "PROGRESS": "BOOL",
    "OUTPUT_ENCODING": "BYTES",
}

OUTPUTS: dict[str, str] = {
    "EDITED_IMAGE": "BYTES",
    "TEMPLATE": "BYTES",
    "TEMPLATES": "BYTES",
    "STEP": "INT32",
    "TOTAL_STEPS": "INT32",
    "COMPUTED_TOKENS": "INT32",
    "NUM_TOKENS": "INT32",
    "REQUEST_ID": "BYTES",
    "TIMELINE": "BYTES",
}
