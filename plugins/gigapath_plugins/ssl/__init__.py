"""Self-supervised and contrastive objectives (ssl_objective hook): DINOv2 on tiles (SPEC §2), masked
autoencoding of tile embeddings with a slide encoder (SPEC §3), slide–report CLIP (SPEC §5)."""
