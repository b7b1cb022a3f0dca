"""Losses: DINO (CLS), iBOT (masked patches), KoLeo, and the teacher normalisations."""
