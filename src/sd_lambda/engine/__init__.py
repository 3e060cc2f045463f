"""The engine: a loaded diffusers pipeline that turns generation parameters into an image.

``generation`` (what a generation is, no torch), ``cpu`` (how many threads, which dtype),
``torch_engine`` (the torch backend: ``Engine.load`` once, ``Engine.generate`` many) and ``accel``
(optional accelerations, each one module). Importing this package imports no torch.
"""
