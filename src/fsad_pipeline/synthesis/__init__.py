"""Pseudo-anomaly synthesis: foreground masks, Perlin noise masks, texture sources and
DRAEM/DFD-style blending of textures into normal images."""
