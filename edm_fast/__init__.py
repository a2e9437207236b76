"""edm-fast: EDM diffusion models (Karras et al. 2022), exact reference and fast samplers.

Importing this package never initialises CUDA and needs neither a GPU nor the compiled
extension: heavy or optional parts are imported lazily.
"""

__version__ = "0.1.0"
