"""imgaug 0.4.0 on NumPy 2 and OpenCV 5: restore what it needs before it is imported, then
repair what broke, each fix at the narrowest point and named after what broke.

Import imgaug through this module (``from trainlab.data.imgaug_compat import iaa``) so the
fixes are always in place. Every replacement is a module-level function, so augmenters
holding one still pickle into DataLoader workers started with ``spawn``/``forkserver``
(unpickling imports this module first, through trainlab.data.augment).
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import skimage.filters

# Removed in NumPy 2: imgaug reads np.sctypes at import and uses the np.bool/np.complex
# aliases; imagecorruptions (imgaug's imgcorruptlike) uses np.float_.
if not hasattr(np, "sctypes"):
    np.sctypes = {
        "int": [np.int8, np.int16, np.int32, np.int64],
        "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
        "float": [np.float16, np.float32, np.float64, np.longdouble],
        "complex": [np.complex64, np.complex128, np.clongdouble],
        "others": [bool, object, bytes, str, np.void],
    }
for _alias, _type in (("bool", np.bool_), ("complex", np.complex128), ("float_", np.float64)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _type)

import cv2  # noqa: E402
import imgaug as ia  # noqa: E402
import imgaug.augmenters as iaa  # noqa: E402
from imgaug.augmentables.segmaps import SegmentationMapsOnImage  # noqa: E402
from imgaug.augmenters import color as _color  # noqa: E402
from imgaug.augmenters import geometric as _geometric  # noqa: E402
from imgaug.augmenters import meta as _meta  # noqa: E402
from imgaug.augmenters import pillike as _pillike  # noqa: E402

# ------------------------------------------------------------------ OpenCV 5
# OpenCV 5 accepts at most 128 channels per array (OpenCV 4: 512, which imgaug splits for);
# cartToPolar returns 1-D arrays for 1-D input (OpenCV 4: N×1); cubic remap of float64
# overflows to NaN beyond float32's range. imgaug's modules see a stand-in for cv2 that
# keeps OpenCV 4's behaviour for those calls (and resizes masks pixel-centre aligned) and
# passes everything else through.
OPENCV_MAX_CHANNELS = 128


def _in_channel_chunks(function, src, *args, table=None, **kwargs):
    """Call ``function`` on slices of at most 128 channels and stack the results (and
    slice a per-channel lookup ``table`` alike)."""
    if src.ndim < 3 or src.shape[2] <= OPENCV_MAX_CHANNELS:
        return function(src, *args, **kwargs) if table is None else function(src, table, **kwargs)
    dst = kwargs.pop("dst", None)
    parts = []
    for start in range(0, src.shape[2], OPENCV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(src[:, :, start : start + OPENCV_MAX_CHANNELS])
        if table is not None:
            lut = table if table.shape[-1] == 1 or table.ndim < 3 else np.ascontiguousarray(
                table[..., start : start + OPENCV_MAX_CHANNELS]
            )
            parts.append(np.atleast_3d(function(chunk, lut, **kwargs)))
        else:
            parts.append(np.atleast_3d(function(chunk, *args, **kwargs)))
    out = np.concatenate(parts, axis=2)
    if dst is not None:
        dst[...] = out
        return dst
    return out


def _lut(src, lut, **kwargs):
    return _in_channel_chunks(cv2.LUT, src, table=lut, **kwargs)


def _blur(src, *args, **kwargs):
    return _in_channel_chunks(cv2.blur, src, *args, **kwargs)


def _gaussian_blur(src, *args, **kwargs):
    return _in_channel_chunks(cv2.GaussianBlur, src, *args, **kwargs)


def _median_blur(src, *args, **kwargs):
    return _in_channel_chunks(cv2.medianBlur, src, *args, **kwargs)


def _flip(src, *args, **kwargs):
    return _in_channel_chunks(cv2.flip, src, *args, **kwargs)


def _resize(src, dsize, *args, **kwargs):
    """Nearest-neighbour resizes (segmentation maps, after Crop/Pad with keep_size, Resize,
    PerspectiveTransform) sample pixel centres, as the images' linear resizes do; cv2's
    INTER_NEAREST samples corners and shifted masks ~0.5 px against their images."""
    if kwargs.get("interpolation") == cv2.INTER_NEAREST:
        kwargs["interpolation"] = cv2.INTER_NEAREST_EXACT
    return _in_channel_chunks(cv2.resize, src, dsize, *args, **kwargs)


def _cart_to_polar(x, y, *args, **kwargs):
    """Magnitudes and angles shaped like the input, as OpenCV 4 returned them."""
    magnitude, angle = cv2.cartToPolar(x, y, *args, **kwargs)
    shape = np.shape(x) if np.ndim(x) > 1 else (-1, 1)
    return magnitude.reshape(shape), angle.reshape(shape)


def _remap(src, map1, map2, interpolation, *args, **kwargs):
    """Cubic/Lanczos remap of float64 beyond float32's range: remap the image scaled into
    range and scale back (interpolation is linear in the pixel values)."""
    if src.dtype == np.float64 and interpolation in (cv2.INTER_CUBIC, cv2.INTER_LANCZOS4):
        peak = float(np.abs(src).max()) if src.size else 0.0
        if peak > float(np.finfo(np.float32).max):
            if "borderValue" in kwargs:
                kwargs["borderValue"] = tuple(np.divide(kwargs["borderValue"], peak).tolist())
            scaled = cv2.remap(src / peak, map1, map2, interpolation, *args, **kwargs)
            return scaled * peak
    return cv2.remap(src, map1, map2, interpolation, *args, **kwargs)


class _OpenCV4Calls(types.ModuleType):
    """cv2 as imgaug expects it; attributes not overridden here are cv2's own."""

    LUT = staticmethod(_lut)
    blur = staticmethod(_blur)
    GaussianBlur = staticmethod(_gaussian_blur)
    medianBlur = staticmethod(_median_blur)
    flip = staticmethod(_flip)
    resize = staticmethod(_resize)
    cartToPolar = staticmethod(_cart_to_polar)
    remap = staticmethod(_remap)

    def __getattr__(self, name):
        return getattr(cv2, name)


_cv2_for_imgaug = _OpenCV4Calls("cv2")
for _name, _module in list(sys.modules.items()):
    if _name.startswith("imgaug") and getattr(_module, "cv2", None) is cv2:
        _module.cv2 = _cv2_for_imgaug


# ------------------------------------------------------------------ NumPy 2
_generate_shift_maps = _geometric.ElasticTransformation.__dict__["_generate_shift_maps"].__func__


def _float32_shift_maps(cls, shape, alpha, sigma, random_state):
    """ElasticTransformation: NumPy 2 promotion makes the shift maps float64, which
    OpenCV's remap/convertMaps rejects; imgaug built them as float32 under NumPy 1."""
    dx, dy = _generate_shift_maps(cls, shape, alpha, sigma, random_state)
    return dx.astype(np.float32), dy.astype(np.float32)


_geometric.ElasticTransformation._generate_shift_maps = classmethod(_float32_shift_maps)

_autocontrast_pil = _pillike._autocontrast_pil


def _autocontrast_scalar_cutoff(image, cutoff, ignore):
    """pillike.Autocontrast: imgaug passes the cutoff as a 1-element array; Pillow wants a
    number. Replacing this helper (not ``pillike.autocontrast``, which augmenters hold a
    reference to) keeps every Autocontrast picklable."""
    return _autocontrast_pil(image, np.asarray(cutoff).ravel()[0].item(), ignore)


_pillike._autocontrast_pil = _autocontrast_scalar_cutoff


def _channels_of(self, image):
    """The selected channels that exist in ``image``: NumPy 2 refuses out-of-range indices
    on an empty axis, which NumPy 1 accepted, so WithChannels failed on 0-channel images."""
    available = image.shape[-1] if image.ndim == 3 else 1
    return [channel for channel in self.channels if channel < available]


def _reduce_images_to_channels(self, images):
    if self.channels is None:
        return images
    if ia.is_np_array(images):
        return images[..., _channels_of(self, images[0] if len(images) else images)]
    return [image[..., _channels_of(self, image)] for image in images]


def _invert_reduce_images_to_channels(self, images_aug, images):
    if self.channels is None:
        return images_aug
    for image, image_aug in zip(images, images_aug, strict=True):
        image[..., _channels_of(self, image)] = image_aug
    return images


_meta.WithChannels._reduce_images_to_channels = _reduce_images_to_channels
_meta.WithChannels._invert_reduce_images_to_channels = _invert_reduce_images_to_channels


def _kelvins_to_rgb_multipliers(self, kelvins):
    """ChangeColorTemperature: one RGB multiplier row per image; imgaug broadcast an (N,)
    interpolation factor against (N, 3) rows, which fails for batches of more than one."""
    index = np.clip(np.asarray(kelvins, dtype=np.float64), 1000, 40000) / 100 - 10
    low, high = np.floor(index).astype(np.int32), np.ceil(index).astype(np.int32)
    fraction = (index - low)[:, np.newaxis]
    return self.table[low] + fraction * (self.table[high] - self.table[low])


_color._KelvinToRGBTable.transform_kelvins_to_rgb_multipliers = _kelvins_to_rgb_multipliers


# ------------------------------------------------------------ spawned workers
# AddToHueAndSaturation fills its class-level lookup tables in the constructor, so in a
# process that only unpickled one (a spawned DataLoader worker) they were still None.
if _color.AddToHueAndSaturation._LUT_CACHE is None:
    _color.AddToHueAndSaturation._LUT_CACHE = _color.AddToHueAndSaturation._generate_lut_table()


# ------------------------------------------------------------ imagecorruptions
def _resource_filename(package: str, resource: str) -> str:
    """pkg_resources.resource_filename, which setuptools no longer ships."""
    return str(Path(sys.modules[package].__file__).parent / resource)


_skimage_gaussian = skimage.filters.gaussian


def _gaussian_multichannel(image, sigma=1.0, *args, multichannel=None, **kwargs):
    """skimage's gaussian, still accepting ``multichannel`` (removed in scikit-image 0.19),
    which imgcorruptlike and imagecorruptions pass."""
    if multichannel:
        kwargs.setdefault("channel_axis", -1)
    return _skimage_gaussian(image, sigma, *args, **kwargs)


skimage.filters.gaussian = _gaussian_multichannel


def _load_imagecorruptions() -> None:
    """imgcorruptlike's backend, importable on current setuptools and scikit-image."""
    if importlib.util.find_spec("imagecorruptions") is None:
        return  # imgaug then says how to install it when an imgcorruptlike augmenter runs
    shim = None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # it imports scipy.ndimage.interpolation (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            import imagecorruptions.corruptions  # noqa: F401
    finally:
        if shim is not None:
            del sys.modules["pkg_resources"]  # only imagecorruptions keeps the function


_load_imagecorruptions()

__all__ = ["ia", "iaa", "SegmentationMapsOnImage"]
