"""GLANN (Hoshen, Li & Malik 2019; official code yedidh/glann), in progress (issue 15): the GLO
generator, latent table and IMLE mapping (networks.py), the official VGG distance (perceptual.py)
and IMLE's exact nearest-neighbour search over ranks (search.py). The task (stages glo, imle,
imle_pixels), the recipes and the tools come with the rest of the issue, so the family is not
registered in framework/models/__init__.py yet."""
