"""Caption templates for Textual Inversion's --use_object_template / --use_style_template.

Each has one `{}` slot that receives the trained tokens. The lists are of the same kind and size as
sd-scripts' (27 object, 19 style sentences), written for this project.
"""

from __future__ import annotations

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image showing a {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a dim photo of a {}",
    "a blurry photo of a {}",
    "a sharp photo of a {}",
    "a photo of the {}",
    "a picture of the {}",
    "a good photo of the {}",
    "a cropped photo of the {}",
    "a photo of one {}",
    "a photo of my {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a rendering of a {}",
    "a rendition of the {}",
    "a clean photo of a {}",
    "a dirty photo of the {}",
    "a photo of a nice {}",
    "a photo of a strange {}",
    "a snapshot of a {}",
    "a studio photo of a {}",
    "a plain photo of the {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a picture in the style of {}",
    "an image in the style of {}",
    "artwork in the style of {}",
    "a rendering in the style of {}",
    "a drawing in the style of {}",
    "a sketch in the style of {}",
    "an illustration in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a detailed painting in the style of {}",
    "a cropped painting in the style of {}",
    "a clean painting in the style of {}",
    "a rough painting in the style of {}",
    "a nice painting in the style of {}",
    "a strange painting in the style of {}",
    "a poster in the style of {}",
)
