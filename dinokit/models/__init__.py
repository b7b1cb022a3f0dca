"""Models: the ViT backbone with switchable attention, and the DINO/iBOT heads."""
