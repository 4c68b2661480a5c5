"""PyTorch mirror modules with the official checkpoints' state-dict keys (our own code, written from the spec).

- :mod:`export.mirror.mmdit`: the pyramidal MMDiT (Neodragon 18 blocks, Pyramid Flow SD3 24 + context embedder);
- :mod:`export.mirror.vae`: causal VAE encoder, native decoder, the VAE wrappers;
- :mod:`export.mirror.light_decoder`: Neodragon's TAEHV-style light decoder;
- :mod:`export.mirror.text`: transformers T5 / CLIP inside the official wrappers (DistilT5, ContextAdapter).

Build any of them at full size without allocating under ``with torch.device("meta"):``.
"""

from export.mirror.light_decoder import LightDecoder
from export.mirror.mmdit import PyramidMMDiT
from export.mirror.text import ContextAdapter, DistilT5, TextConditioner, clip_text, t5_encoder
from export.mirror.vae import CausalVAEDecoder, CausalVAEEncoder, CausalVideoVAE

__all__ = [
    "CausalVAEDecoder", "CausalVAEEncoder", "CausalVideoVAE", "ContextAdapter", "DistilT5", "LightDecoder",
    "PyramidMMDiT", "TextConditioner", "clip_text", "t5_encoder",
]
