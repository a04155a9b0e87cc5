"""The moshivis-mlx app: live conversation in the terminal, file mode, recording, demo.

The models and `moshivis_mlx.stream` never import anything from here.
"""
