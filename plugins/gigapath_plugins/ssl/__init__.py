"""Self-supervised and contrastive objectives (ssl_objective hook): DINOv2 on tiles (Xu et al. 2024, Methods: tile
encoder), masked
autoencoding of tile embeddings with a slide encoder (Xu et al. 2024, Methods: slide encoder (LongNet)), slide–report
CLIP (Xu et al. 2024, Methods: slide-level vision-language alignment)."""
