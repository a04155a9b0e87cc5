"""The moshivis-mlx app: a conversation session (session.py) and what carries it: live
conversation in the terminal, file mode, recording, demo.

The models and `moshivis_mlx.stream` never import anything from here.
"""
