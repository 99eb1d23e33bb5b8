"""LongNet slide encoder of Prov-GigaPath (``longnet`` plugin of the ``slide_encoder`` kind).

Modules: :mod:`.position` (sin-cos positions on demand), :mod:`.kernels` (attention with log-sum-exp),
:mod:`.dilated_attention` (LongNet dilated attention), :mod:`.model` (the checkpoint-compatible encoder).
"""

from gigapath_core import hookimpl

from .model import LongNetSlideEncoder, reference_segment_lengths

__all__ = ["LongNetSlideEncoder", "reference_segment_lengths"]


@hookimpl
def gigapath_slide_encoders():
    return [LongNetSlideEncoder]
