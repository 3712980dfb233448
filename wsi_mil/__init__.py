"""wsi-mil: whole-slide histopathology multiple-instance learning.

Data flows one way: ``slide`` -> ``tissue`` -> ``tiling`` -> ``features`` -> ``mil`` -> ``heatmap``;
``cli`` and ``config`` sit on top and ``store`` below. Importing the package is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
