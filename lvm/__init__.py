"""LVM: Large Vision Models trained on visual sentences, pixels only."""
