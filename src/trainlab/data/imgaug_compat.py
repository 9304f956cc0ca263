"""imgaug 0.4.0 on NumPy 2: restore what it needs before it is imported, then fix its breakages.

Import imgaug through this module (``from trainlab.data.imgaug_compat import iaa``) so the
patches are always in place. imgaug is unmaintained; each patch names what broke.
"""

from __future__ import annotations

import numpy as np

# Removed in NumPy 2: imgaug reads np.sctypes at import and uses np.bool/np.complex aliases.
if not hasattr(np, "sctypes"):
    np.sctypes = {
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64, np.longdouble],
        "complex": [np.complex64, np.complex128, np.clongdouble],
        "others": [bool, object, bytes, str, np.void],
    }
for _alias, _type in (("bool", np.bool_), ("complex", np.complex128)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _type)

import imgaug as ia  # noqa: E402
import imgaug.augmenters as iaa  # noqa: E402
from imgaug.augmentables.segmaps import SegmentationMapsOnImage  # noqa: E402
from imgaug.augmenters import geometric as _geometric  # noqa: E402
from imgaug.augmenters import pillike as _pillike  # noqa: E402


def _float32_shift_maps(original):
    """ElasticTransformation: NumPy 2 promotion makes the shift maps float64, which
    OpenCV's remap/convertMaps rejects; imgaug built them as float32 under NumPy 1."""

    def generate(cls, shape, alpha, sigma, random_state):
        dx, dy = original.__func__(cls, shape, alpha, sigma, random_state)
        return dx.astype(np.float32), dy.astype(np.float32)

    return classmethod(generate)


_geometric.ElasticTransformation._generate_shift_maps = _float32_shift_maps(
    _geometric.ElasticTransformation.__dict__["_generate_shift_maps"]
)


def _int_cutoff(original):
    """pillike.Autocontrast: imgaug passes the cutoff as a 1-element array; Pillow wants an int."""

    def autocontrast(image, cutoff=0, ignore=None):
        return original(image, cutoff=int(np.asarray(cutoff).ravel()[0]), ignore=ignore)

    return autocontrast


_pillike.autocontrast = _int_cutoff(_pillike.autocontrast)

__all__ = ["ia", "iaa", "SegmentationMapsOnImage"]
