"""Model forge for the backdoor deployment gate.

``models.triggers`` (numpy only) describes and applies triggers and prepares
ONNX inputs from a manifest's ``input_spec``; ``models.forge`` (torch) trains,
exports and measures the demo models and the zoo. Importing ``models`` does
not import torch.
"""

from models.triggers import (  # noqa: F401
    apply_trigger,
    apply_triggers,
    blend_pattern,
    make_blend_trigger,
    make_patch_trigger,
    prepare_input,
    trigger_mask,
)
