"""After training: weights from any checkpoint (checkpoints), BatchNorm re-estimation
(recalibrate), importance-weighted bits/dim (bpd), sample grids and sampling speed (sampling).
The command lines in tools/ are thin wrappers over these functions."""
