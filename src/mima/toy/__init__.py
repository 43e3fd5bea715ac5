"""The embedded toy world in one wing: the procedural world (`world`), its tiny Stable Diffusion (`model`), how
that model is pretrained (`pretrain`), the concept classifier that judges samples (`judge`) and the per-concept
recognition check (`quality`). Nothing outside `toy/` and the CLI needs it to run on a real model."""
